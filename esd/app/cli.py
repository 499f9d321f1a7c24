"""``esd app`` (and ``python app.py``): the web app, as the paper's README has it: train, test, evaluate, attack
and export erasures in the browser, on http://127.0.0.1:7860/ by default."""

from esd.app.actions import Pipelines
from esd.app.jobs import TrainingQueue
from esd.app.runs import ANY_MODEL, DEFAULT_MAX_ITERATIONS, DEFAULT_MAX_UPLOAD_MB, RunsFolder
from esd.app.ui import build_app, launch
from esd.core.devices import parse_devices
from esd.train.settings import TrainSettings

DEFAULT_RUNS = TrainSettings.__dataclass_fields__["save_path"].default  # esd train's: the app lists its runs


def register(sub) -> None:
    p = sub.add_parser("app", help="the web app: train, test, evaluate, attack and export erasures in the browser")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                   "only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--runs", default=DEFAULT_RUNS, help="the runs folder: the app trains into it, lists the runs "
                   "esd train put there, and writes its files (runs, uploads, exports, caches) nowhere else; only "
                   "the models it offers are read from outside it (default: %(default)s, esd train's --save_path)")
    p.add_argument("--devices", "--device", dest="devices", help="devices to train on, one training at a time on "
                   "each: 'cpu', '0', '0,1' (default: the first GPU if any, else the CPU)")
    p.add_argument("--max_upload_mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                   help="largest uploaded weights file, in MB (default: %(default)s)")
    p.add_argument("--models", help="base models the page may train from or name for an upload, comma-separated "
                   "(hub ids, local folders), beside the toy models and the runs' own bases; '*': any model esd "
                   "train takes (default: '*' on a loopback --host, none elsewhere: a stranger on the network "
                   "cannot make the app read a folder or the hub)")
    p.add_argument("--max_iterations", type=int, default=DEFAULT_MAX_ITERATIONS,
                   help="the most iterations a training from the page may ask for (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked)")
    p.set_defaults(func=cmd_app)


def cmd_app(args) -> int:
    devices = [str(d) for d in parse_devices(args.devices)]
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be from 1 to 65535, got {args.port}")
    for flag in ("max_upload_mb", "max_iterations"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    loopback = args.host in ("127.0.0.1", "localhost", "::1") and not args.share
    models = tuple(m.strip() for m in (args.models or (ANY_MODEL if loopback else "")).split(",") if m.strip())
    runs = RunsFolder(args.runs, args.max_upload_mb, models, args.max_iterations)
    queue = TrainingQueue(tuple(devices), on_finish=lambda job: runs.changed())
    app = build_app(runs, queue, Pipelines(devices[0]))
    offered = "any model esd train takes" if ANY_MODEL in models else ", ".join(runs.offered_models())
    print(f"esd app: runs folder {runs.root}; trainings on {', '.join(devices)}; base models: {offered}; "
          f"http://{args.host}:{args.port}/")
    launch(app, runs, args.host, args.port, args.share)
    return 0
