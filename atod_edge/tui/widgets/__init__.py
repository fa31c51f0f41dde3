"""Widgets of the terminal app: the curve plot and the coloured token view."""
