"""Reports a person reads: HTML with plots, built from the JSON results."""

from .html import render_html

__all__ = ["render_html"]
