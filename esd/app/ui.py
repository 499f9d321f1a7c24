"""The page of ``esd app``: five tabs (Train, Test, Evaluate, Attack, Export) laid out with Gradio over the
functions of :mod:`esd.app.actions`. Every callback is guarded: a bad input (or any failure) is one line in the
tab's status, never a stack trace; the server's log gets the traceback of anything that is not a ValueError.

Gradio writes what it serves (images, downloads) and what is uploaded into ``<runs>/.gradio``, and the app
allows it no other folder than the runs folder: nothing is served from outside it.
"""

import os
import secrets
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from esd.app import actions
from esd.app.jobs import DONE, RUNNING, TrainingQueue
from esd.app.runs import ANY_MODEL, RunsFolder
from esd.families.sources import TOY_MODELS
from esd.formats.exports import FORMATS
from esd.train.presets import DEFAULT_PRESET, PRESETS

TITLE = "ESD: erase a concept from a diffusion model"
INTRO = ("Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023). **Train** erases a concept from a "
         "model's weights; **Test** draws the base and the erased model from the same seeds; **Evaluate** measures a "
         "toy erasure; **Attack** tries to bring the concept back; **Export** writes a LoRA, a single file or a "
         "diffusers folder. The toy models (`toy`, `toy-dit`) train in seconds on a CPU; a real model (a hub id or a "
         "local diffusers folder) needs a GPU: ESD-u on SD 1.4 takes about 17 GB.")
JOB_COLUMNS = ["job", "state", "place in queue", "run", "concept", "progress", "outcome"]
RUN_COLUMNS = ["run", "status", "concept", "method", "base model", "iterations"]
EVAL_COLUMNS = ["prompt", "group", "held out", "before", "after"]
POLL_SECONDS = 1.0
PLOT_POINTS = 250  # the loss curve's points at most (a long training is shown thinned)
# No web fonts: the page loads nothing from outside this machine.
FONTS = {"font": ["ui-sans-serif", "system-ui", "sans-serif"], "font_mono": ["ui-monospace", "monospace"]}


def error_line(e: Exception) -> str:
    """A failure as the one line the page shows."""
    if not isinstance(e, (ValueError, OSError)):  # a bug, not an input: the operator's log gets the traceback
        traceback.print_exc(file=sys.stderr)
    message = " ".join(str(e).split()) or type(e).__name__
    return f"**Error:** {message}"


def guarded(fn, outputs: int, status: int):
    """``fn`` whose exceptions become one line in output ``status`` (the other outputs left as they are)."""
    import gradio as gr  # heavy (2 s to import): loaded by esd app only, not by every esd command

    def call(*args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure is shown as one line in the page
            result = [gr.skip()] * outputs
            result[status] = error_line(e)
            return tuple(result) if outputs > 1 else result[0]

    return call


def served(runs: RunsFolder, path: str) -> str:
    """A copy of ``path`` (a file in the runs folder) in Gradio's cache, ``<runs>/.gradio``: the one folder the page
    is served from (as a download: Gradio sends what is not an image as an attachment, never as a page)."""
    copy = runs.root / ".gradio" / "app" / secrets.token_hex(16) / Path(path).name
    copy.parent.mkdir(parents=True)
    shutil.copyfile(path, copy)
    return str(copy)


def picture(path: str) -> np.ndarray:
    """An image file's pixels, which Gradio writes into its own cache to show."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def progress_html(job) -> str:
    if job is None:
        return "<div id='progress-none'>no training yet</div>"
    done = job.iteration - job.start_iteration
    total = max(job.total - job.start_iteration, 1)
    return (f"<div><progress id='train-bar' value='{job.iteration}' max='{job.total}' style='width:100%'></progress>"
            f"<div id='train-iteration'>job {job.id}: iteration {job.iteration} of {job.total} ({job.state}; "
            f"{100 * done / total:.0f}% of this session)</div></div>")


def build_app(runs: RunsFolder, queue: TrainingQueue, pipelines: actions.Pipelines, poll_seconds: float = POLL_SECONDS):
    """The Gradio Blocks of the app (not launched); the page asks for the trainings' progress every
    ``poll_seconds``."""
    os.environ["GRADIO_TEMP_DIR"] = str(runs.root / ".gradio")  # uploads and served files, inside the runs folder
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr  # heavy (2 s to import): loaded by esd app only, not by every esd command

    def jobs_frame():
        rows = [[j.id, j.state, queue.place(j) or "", j.run_dir.name, j.config.prompt, f"{j.iteration}/{j.total}",
                 j.message] for j in reversed(queue.jobs())]
        return pd.DataFrame(rows, columns=JOB_COLUMNS)

    def runs_frame():
        return pd.DataFrame(actions.run_rows(runs), columns=RUN_COLUMNS)

    def shown_job(job_id):
        """This page's own job, else the one training now, else the newest."""
        if job_id is not None:
            try:
                return queue.get(job_id)
            except ValueError:
                pass
        jobs = queue.jobs()
        running = [j for j in jobs if j.state == RUNNING]
        return (running or jobs or [None])[-1]

    def status_of(job) -> str:
        if job is None:
            return "Fill in the form and press **Train**."
        place = queue.place(job)
        if place:
            return f"job {job.id} ({job.run_dir.name}) is queued: place {place} on {job.device}"
        return f"job {job.id} ({job.run_dir.name}): {job.message or job.state}"

    def loss_frame(job):
        points = job.losses if job is not None else []
        if len(points) > PLOT_POINTS:  # every k-th iteration and the last: the browser redraws it every poll
            points = points[::-(-len(points) // PLOT_POINTS)] + points[-1:]
        frame = pd.DataFrame(points, columns=["iteration", "loss"])  # numbers, so the axes are quantitative
        return frame.astype({"iteration": "int64", "loss": "float64"})

    # Gradio's cache of served and uploaded files: checked hourly, what is older than a day removed
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        job_state = gr.State(None)  # this page's training job
        announced = gr.State(None)  # the finished job whose run this page has chosen in its erasure lists
        with gr.Tabs():
            # -- Train --------------------------------------------------------------------------
            with gr.Tab("Train", id="train") as train_tab:
                defaults = actions.form_defaults("toy")
                with gr.Row():
                    with gr.Column(scale=1):
                        base = gr.Textbox("toy", label="base model", elem_id="base-model", info=(
                            f"{', '.join(TOY_MODELS)}, a hub id or a local diffusers folder" if ANY_MODEL in
                            runs.models else "one of: " + ", ".join(runs.offered_models())))
                        concept = gr.Textbox("green", label="concept to erase", elem_id="concept",
                                             info="toy concepts: a colour (red, green, blue...) or a shape")
                        erase_from = gr.Textbox("", label="erase from (optional)",
                                                info="erase the concept from this prompt only")
                        method = gr.Dropdown(actions.method_choices("toy"), value=defaults["train_method"],
                                             label="train method", elem_id="train-method",
                                             info="ESD-x (cross-attention) for styles, ESD-u for nudity and objects")
                        preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="preset",
                                             info="paper: the original loop; official: the current official code; "
                                                  "fast: trajectory reuse")
                        with gr.Row():
                            eta = gr.Number(defaults["negative_guidance"], label="η (negative guidance)")
                            iterations = gr.Number(defaults["iterations"], label="iterations", precision=0,
                                                   elem_id="iterations")
                            lr = gr.Number(defaults["lr"], label="learning rate")
                        with gr.Row():
                            seed = gr.Textbox("", label="seed (empty: drawn, recorded in args.json)")
                            lora_rank = gr.Textbox("", label="LoRA rank (empty: full fine-tuning)")
                        with gr.Accordion("more settings", open=False):
                            with gr.Row():
                                batch_size = gr.Number(defaults["batch_size"], label="batch size", precision=0)
                                ddim_steps = gr.Number(defaults["ddim_steps"], label="sampler steps", precision=0)
                            start_guidance = gr.Number(defaults["start_guidance"], label="sampler guidance (x_t)")
                            save_every = gr.Number(0, label="checkpoint every N iterations (0: never)",
                                                   precision=0)
                            name = gr.Textbox("", label="run name (empty: from the settings)")
                            ckpt_path = gr.Textbox("", label="single-file checkpoint to erase from (optional)",
                                                   info="a .ckpt/.safetensors of SD 1.x/2.x/SDXL, or an SD3/FLUX "
                                                        "transformer; the base model above gives its configs")
                            ckpt_config = gr.Textbox("", label="the checkpoint's configs (optional: a diffusers "
                                                               "folder or hub id; SD3/FLUX files need it)")
                        with gr.Row():
                            train_button = gr.Button("Train", variant="primary", elem_id="train-button")
                            cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
                        with gr.Row():
                            resumable = gr.Dropdown([], label="resumable runs (cancelled)", scale=3)
                            resume_button = gr.Button("Resume", scale=1)
                    with gr.Column(scale=1):
                        train_message = gr.Markdown("", elem_id="train-message")  # what a click did, or its error
                        train_status = gr.Markdown("Fill in the form and press **Train**.", elem_id="train-status")
                        progress = gr.HTML(progress_html(None), elem_id="train-progress")
                        loss_plot = gr.LinePlot(loss_frame(None), x="iteration", y="loss", title="loss",
                                                elem_id="loss-plot", height=240)
                        jobs_table = gr.Dataframe(jobs_frame(), label="trainings (one at a time per device)",
                                                  interactive=False, elem_id="jobs")
                        runs_table = gr.Dataframe(runs_frame(), label=f"runs in {runs.root}", interactive=False,
                                                  elem_id="runs")

            # -- Test ---------------------------------------------------------------------------
            with gr.Tab("Test", id="test") as test_tab:
                with gr.Row():
                    test_erasure = gr.Dropdown(runs.erasures(), label="erasure (a run or an upload)",
                                               elem_id="test-erasure", scale=3)
                    upload = gr.File(label="upload erased weights (.safetensors, .pt, .ckpt: this tool's or the "
                                           "official ESD code's)", file_types=[".safetensors", ".pt", ".ckpt"],
                                     type="filepath", scale=2)
                    upload_base = gr.Textbox("", label="base model of an upload (when its file does not say)",
                                             scale=2)
                with gr.Row():
                    prompt = gr.Textbox("a green circle", label="prompt", elem_id="test-prompt", scale=3)
                    negative = gr.Textbox("", label="negative prompt (optional)", scale=2)
                    seeds = gr.Textbox("0-3", label="seeds", scale=1)
                    steps = gr.Number(25, label="steps", precision=0, scale=1)
                    guidance = gr.Number(7.5, label="guidance", scale=1)
                test_button = gr.Button("Draw both", variant="primary", elem_id="test-button")
                test_status = gr.Markdown("", elem_id="test-status")
                with gr.Row():
                    base_gallery = gr.Gallery(label="base model", columns=2, elem_id="base-images", format="png")
                    erased_gallery = gr.Gallery(label="erased model", columns=2, elem_id="erased-images",
                                                format="png")

            # -- Evaluate -----------------------------------------------------------------------
            with gr.Tab("Evaluate", id="evaluate") as eval_tab:
                with gr.Row():
                    eval_erasure = gr.Dropdown(runs.erasures(), label="erasure of a toy model", scale=3)
                    samples = gr.Number(100, label="images per prompt", precision=0,
                                        info="the demo's 100: about 2 minutes on 2 CPU cores the first time (the base "
                                             "model's verdicts are then kept), 1-2 minutes after")
                    eval_seed = gr.Number(0, label="first image seed", precision=0)
                eval_button = gr.Button("Measure", variant="primary", elem_id="eval-button")
                eval_status = gr.Markdown("", elem_id="eval-status")
                eval_chart = gr.Image(label="presence and accuracy, before and after (Wilson 95%)", format="png")
                eval_table = gr.Dataframe(pd.DataFrame(columns=EVAL_COLUMNS), interactive=False)

            # -- Attack -------------------------------------------------------------------------
            with gr.Tab("Attack", id="attack") as attack_tab:
                with gr.Row():
                    attack_erasure = gr.Dropdown(runs.erasures(), label="erasure (SD 1.x/2.x or the UNet toy)",
                                                 elem_id="attack-erasure", scale=3)
                    kind = gr.Radio(["prefix", "inversion"], value="prefix", label="attack",
                                    info="prefix: UnlearnDiffAtk's adversarial tokens; inversion: a learned token")
                    judge = gr.Dropdown([("the toy judge (toy models)", ""), ("NudeNet (nudity)", "nudenet"),
                                         ("ResNet-50 (an ImageNet class)", "classify")], value="", label="judge")
                with gr.Row():
                    attack_prompt = gr.Textbox("", label="prompt (empty: the erased concept)", scale=3)
                    attack_seeds = gr.Textbox("0-1", label="seeds (one row each)", elem_id="attack-seeds")
                    attack_samples = gr.Number(2, label="images per row", precision=0)
                    attack_steps = gr.Textbox("", label="steps (empty: the attack's default)", elem_id="attack-steps")
                attack_button = gr.Button("Attack", variant="primary", elem_id="attack-button")
                attack_status = gr.Markdown("", elem_id="attack-status")
                attack_grid = gr.Image(label="base / erased / erased under attack", format="png")

            # -- Export -------------------------------------------------------------------------
            with gr.Tab("Export", id="export") as export_tab:
                with gr.Row():
                    export_erasure = gr.Dropdown(runs.erasures(), label="erasure", elem_id="export-erasure", scale=3)
                    fmt = gr.Radio(list(FORMATS), value="lora", label="format", elem_id="export-format",
                                   info="lora: for diffusers, A1111 and ComfyUI; single-file: the original layout; "
                                        "diffusers: a pipeline folder (zipped)")
                    rank = gr.Textbox("auto", label="LoRA rank (a number, auto or full)")
                export_button = gr.Button("Export", variant="primary", elem_id="export-button")
                export_status = gr.Markdown("", elem_id="export-status")
                export_file = gr.File(label="download", elem_id="export-file", interactive=False)
                card = gr.Markdown("", elem_id="model-card")

        # -- events --------------------------------------------------------------------------------
        form = [base, concept, erase_from, method, eta, iterations, lr, preset, seed, lora_rank, batch_size,
                ddim_steps, start_guidance, save_every, name, ckpt_path, ckpt_config]
        last_base = gr.State("toy")  # the model the form's numbers are for

        def on_base(model, preset_name, previous):
            """A new base model: the family's methods, and the numbers for it; the same one: the form as it is."""
            model = actions.resolved_base(runs, model)
            if model == previous:
                return (*[gr.skip()] * 7, previous, "")
            d = actions.form_defaults(model, preset_name)
            return (gr.update(choices=actions.method_choices(model), value=d["train_method"]), d["negative_guidance"],
                    d["iterations"], d["lr"], d["batch_size"], d["ddim_steps"], d["start_guidance"], model, "")

        base_outputs = [method, eta, iterations, lr, batch_size, ddim_steps, start_guidance, last_base]
        for event in (base.submit, base.blur):
            event(guarded(on_base, len(base_outputs) + 1, len(base_outputs)), [base, preset, last_base],
                  base_outputs + [train_message])

        def on_preset(model, preset_name):
            d = actions.form_defaults(actions.resolved_base(runs, model), preset_name)
            return d["negative_guidance"], d["iterations"], d["lr"], d["ddim_steps"], d["start_guidance"], ""

        preset.input(guarded(on_preset, 6, 5), [base, preset], [eta, iterations, lr, ddim_steps, start_guidance,
                                                                train_message])

        def on_train(*values):
            keys = ["base_model", "concept", "erase_from", "train_method", "negative_guidance", "iterations", "lr",
                    "preset", "seed", "lora_rank", "batch_size", "ddim_steps", "start_guidance", "save_every", "name",
                    "ckpt_path", "ckpt_config"]
            job = queue.submit(actions.train_config(runs, **dict(zip(keys, values))))
            return job.id, f"job {job.id} queued: {job.run_dir.name}", progress_html(job)

        train_button.click(guarded(on_train, 3, 1), form, [job_state, train_message, progress])

        def on_cancel(job_id):
            """This page's own training only: another page's is its own to stop."""
            job = queue.get(job_id) if job_id is not None else None
            if job is None or job.finished:
                raise ValueError("this page has no training queued or running (a training is cancelled from the "
                                 "page that started it)")
            queue.cancel(job.id)
            if job.finished:
                return f"job {job.id}: {job.message}"
            return (f"job {job.id}: cancelling (while its model loads it stops before training, writing nothing; while "
                    "it trains it stops after this iteration and leaves a checkpoint to resume)")

        cancel_button.click(guarded(on_cancel, 1, 0), job_state, train_message)

        def on_resume(run):
            job = queue.submit(actions.resume_config(runs, run))
            return job.id, f"job {job.id} queued: {run}, resumed from {os.path.basename(job.config.resume)}"

        resume_button.click(guarded(on_resume, 2, 1), resumable, [job_state, train_message])

        erasure_lists = [test_erasure, eval_erasure, attack_erasure, export_erasure]

        def poll(job_id, shown, last):
            """Every poll_seconds, for every open page: what changed since its last poll (unchanged parts are not
            sent again, so an open list stays open and the tables do not redraw)."""
            job = shown_job(job_id)
            lists = [gr.skip()] * len(erasure_lists)
            if job is not None and job.id == job_id and job.state == DONE and shown != job.id:
                choices = runs.erasures()
                if job.run_dir.name in choices:  # this page's training has finished: its run is chosen, once
                    shown = job.id
                    lists = [gr.update(choices=choices, value=job.run_dir.name)] * len(erasure_lists)
            names = [r.name for r in runs.runs() if r.status == "resumable"]
            jobs, listed = jobs_frame(), runs_frame()
            now = {"status": status_of(job), "progress": progress_html(job), "loss": len(job.losses) if job else 0,
                   "job": job.id if job else None, "jobs": jobs.values.tolist(), "runs": listed.values.tolist(),
                   "resumable": names}
            last = last or {}

            def fresh(key, value):
                return gr.skip() if last.get(key) == now[key] else value

            return (fresh("status", now["status"]), fresh("progress", now["progress"]),
                    loss_frame(job) if (last.get("loss"), last.get("job")) != (now["loss"], now["job"]) else gr.skip(),
                    fresh("jobs", jobs), fresh("runs", listed), fresh("resumable", gr.update(choices=names)), shown,
                    now, *lists)

        last_poll = gr.State(None)  # what this page was last sent
        gr.Timer(poll_seconds).tick(guarded(poll, 8 + len(erasure_lists), 0),
                                    [job_state, announced, last_poll],
                                    [train_status, progress, loss_plot, jobs_table, runs_table, resumable, announced,
                                     last_poll, *erasure_lists], show_progress="hidden", queue=False)

        def refresh(current):
            choices = runs.erasures()
            return gr.update(choices=choices, value=current if current in choices else
                             (choices[0] if choices else None)), gr.skip()

        for tab, dropdown, status_line in zip([test_tab, eval_tab, attack_tab, export_tab], erasure_lists,
                                              [test_status, eval_status, attack_status, export_status]):
            tab.select(guarded(refresh, 2, 1), dropdown, [dropdown, status_line])
            app.load(guarded(refresh, 2, 1), dropdown, [dropdown, status_line])  # runs made since the app started
        train_tab.select(guarded(lambda: (runs_frame(), gr.skip()), 2, 1), None, [runs_table, train_message])

        def on_upload(path):
            if path is None:
                return gr.skip(), ""
            stored = runs.store_upload(path, os.path.basename(path))
            return gr.update(choices=runs.erasures(), value=stored), f"uploaded {stored}"

        upload.upload(guarded(on_upload, 2, 1), upload, [test_erasure, test_status])

        def on_test(erasure, text, seed_text, n_steps, scale, base_of_upload, negative_text):
            r = actions.side_by_side(runs, pipelines, erasure, text, seed_text, n_steps, scale, base_of_upload,
                                     negative_text)
            return r["line"], r["base"], r["erased"]

        test_button.click(guarded(on_test, 3, 0), [test_erasure, prompt, seeds, steps, guidance, upload_base, negative],
                          [test_status, base_gallery, erased_gallery])

        def on_evaluate(erasure, n, first, base_of_upload):
            r = actions.evaluate(runs, pipelines, erasure, n, first, base_of_upload)
            return r["line"], picture(r["chart"]), pd.DataFrame(r["rows"], columns=EVAL_COLUMNS)

        eval_button.click(guarded(on_evaluate, 3, 0), [eval_erasure, samples, eval_seed, upload_base],
                          [eval_status, eval_chart, eval_table])

        def on_attack(erasure, attack_kind, text, seed_text, n, n_steps, base_of_upload, judge_name):
            r = actions.attack(runs, pipelines, erasure, attack_kind, text, seed_text, n, n_steps, base_of_upload,
                               judge_name)
            return r["line"], picture(r["grid"])

        attack_button.click(guarded(on_attack, 2, 0), [attack_erasure, kind, attack_prompt, attack_seeds,
                                                         attack_samples, attack_steps, upload_base, judge],
                            [attack_status, attack_grid])

        def on_export(erasure, export_format, export_rank, base_of_upload):
            r = actions.export(runs, erasure, export_format, export_rank, base_of_upload)
            return r["line"], served(runs, r["file"]), r["card"]

        export_button.click(guarded(on_export, 3, 0), [export_erasure, fmt, rank, upload_base],
                            [export_status, export_file, card])
    return app


def launch(app, runs: RunsFolder, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True):
    """Serve ``app``: on ``host``:``port``, a public share link only when asked for, uploads capped at the runs
    folder's limit, files served from the runs folder alone. ``block=False`` returns at once (the tests)."""
    import gradio as gr  # heavy (2 s to import): loaded by esd app only, not by every esd command

    app.queue(default_concurrency_limit=1)  # one click at a time per action; trainings have their own queue
    return app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                      max_file_size=runs.max_upload_bytes, ssr_mode=False,  # no allowed_paths: Gradio's cache only
                      show_error=False, quiet=not block, theme=gr.themes.Default(**FONTS), footer_links=[])
