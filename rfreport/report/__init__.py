"""The report stage: the HTML report, its figures and the diff page, rendered from a saved run folder.

May import jinja2 and matplotlib; never imports torch (a run folder is all it reads).
"""
