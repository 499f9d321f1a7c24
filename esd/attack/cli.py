"""``esd attack``: the flags, one per AttackConfig field."""

from esd.attack.config import JUDGES, AttackConfig
from esd.attack.run import run_attack
from esd.families.sources import DEFAULT_BASE_MODEL
from esd.train.attacks import ATTACKS


def register(sub) -> None:
    d = AttackConfig.__dataclass_fields__
    p = sub.add_parser("attack", help="attack an erased model (adversarial prompt prefix or concept inversion) "
                       "and measure how much of the concept comes back")
    p.add_argument("--base_model", default=DEFAULT_BASE_MODEL, help="hub id, local diffusers folder, or 'toy'")
    p.add_argument("--weights", required=True, help="erased weights (.safetensors, .pt, CompVis .ckpt), loaded "
                   "strictly into --base_model's UNet")
    p.add_argument("--prompts", required=True, help="prompt CSV as esd generate reads it (prompt, evaluation_seed, "
                   "case_number); the base model's images of each row are the attack's references")
    p.add_argument("--attack", required=True, choices=list(ATTACKS),
                   help="; ".join(f"{name}: {spec.help}" for name, spec in ATTACKS.items()))
    p.add_argument("--concept", required=True, help="the erased concept as the judge names it ('red', 'nudity', "
                   "an ImageNet class); inversion replaces this word in the prompts by its token")
    p.add_argument("--out", required=True, help="folder for results.csv, summary.json, adversarial_prompts.csv, "
                   "losses.csv, grid.png, images/ (and token.safetensors for inversion)")
    p.add_argument("--judge", choices=list(JUDGES), help="; ".join(f"{k}: {v}" for k, v in JUDGES.items())
                   + " (default: toy for the toy model, required otherwise)")
    p.add_argument("--steps", type=int, help="optimisation steps (default: " + ", ".join(
        f"{name} {spec.steps}" for name, spec in ATTACKS.items()) + ")")
    p.add_argument("--tokens", type=int, default=d["tokens"].default, help="prefix: tokens k (default: %(default)s)")
    p.add_argument("--lr", type=float, help="step size in standard deviations of the token embeddings, so one "
                   "value fits SD's CLIP and the toy encoder (default: " + ", ".join(
                       f"{name} {spec.lr}" for name, spec in ATTACKS.items()) + ")")
    p.add_argument("--batch_size", type=int, default=d["batch_size"].default,
                   help="inversion: references per step (default: %(default)s)")
    p.add_argument("--samples", type=int, default=d["samples"].default,
                   help="images per prompt row in each stage (references, before, after) (default: %(default)s)")
    p.add_argument("--ddim_steps", type=int, default=d["ddim_steps"].default,
                   help="DDIM sampling steps (default: %(default)s)")
    p.add_argument("--guidance_scale", type=float, default=d["guidance_scale"].default,
                   help="classifier-free guidance (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="seed of the attacks' random starts, "
                   "timesteps and noise; images use the CSV's seeds (default: %(default)s)")
    p.add_argument("--devices", "--device", dest="device",
                   help="'cpu', 'cuda:0'... (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier attack in --out")
    p.set_defaults(func=cmd_attack)


def cmd_attack(args) -> int:
    cfg = AttackConfig(**{k: v for k, v in vars(args).items() if k in AttackConfig.__dataclass_fields__})
    run_attack(cfg)
    print(f"results: {cfg.out}/summary.json")
    return 0
