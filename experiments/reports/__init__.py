"""Plots and reports drawn from finished runs."""
