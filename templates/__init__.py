"""The report templates (Jinja2) and stylesheet, shipped as package data of rfreport."""
