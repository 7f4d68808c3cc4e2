"""Rendering a costed step: the HTML report, roofline plots, Chrome-trace timelines."""
