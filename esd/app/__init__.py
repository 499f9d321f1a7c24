"""``esd app``: the web app (Gradio) over the tools: train, test, evaluate, attack and export erasures in the
browser. :mod:`esd.app.runs` is its one folder, :mod:`esd.app.jobs` its training queue, :mod:`esd.app.actions`
what each tab does, :mod:`esd.app.ui` the page."""
