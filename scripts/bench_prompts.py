"""Cost of the prompt methods against SLCA on the same small random ViT, on CPU (README "Prompt baselines").

For each method the shipped config (``method=slca|l2p|dualprompt|coda_prompt``, its optimizer) is built
on the same backbone; the training step it hands to ``clcli.engine.fit`` is captured and timed:
forward (query pass + prompted pass, or SLCA's one pass) + backward + optimizer step, on the same
random batch. Inference: ``predict`` on a batch with the query computed (not served from the test-set
cache). Timings alternate between the methods over several rounds and report the median per method,
so that a slow phase of a shared machine hits every method alike; one run prints every ratio, and
last, as the other benchmark scripts, ``ratio: <SLCA step / mean prompt-method step>``.

    python scripts/bench_prompts.py     # ViT 112 px / patch 8 (197 tokens, as ViT-B/16 at 224), width 192, depth 6, batch 16
    python scripts/bench_prompts.py --threads 2 --rounds 7
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
METHODS = ("slca", "l2p", "dualprompt", "coda_prompt")


def build(method: str, args):
    """The method as `clcli train` builds it, its first task and the captured (step, optimizer)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import clcli.methods.prompts as prompts_module
    import clcli.methods.slca as slca_module
    from clcli.engine import Runtime

    overrides = ["data=synthetic", "backbone=tiny_vit", "device=cpu", f"method={method}", "backbone.reinit_final_norm=false",
                 f"backbone.model_kwargs={{img_size: {args.img}, patch_size: {args.patch}, embed_dim: {args.dim}, "
                 f"depth: {args.depth}, num_heads: {args.heads}, mlp_ratio: 4.0}}", f"optim.batch_size={args.batch}"]
    if method == "dualprompt":
        overrides.append("method.prompt.pool_size=3")  # one E-prompt per task of the 3-task scenario
    if method == "coda_prompt":
        overrides.append("method.prompt.pool_size=99")  # a multiple of the 3 tasks (the default 100 needs 10)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    torch.manual_seed(0)
    backbone = instantiate(cfg.backbone)
    m = instantiate(cfg.method, _partial_=True)(backbone=backbone, optim=cfg.optim, runtime=Runtime(chance_loss_ratio=0))
    task = m.prepare_scenario(instantiate(cfg.data).build(backbone)).tasks[0]
    captured = {}

    def capture(step, loader, **kw):
        captured.update(step=step, optimizer=kw["optimizer"], train_mode=kw.get("train_mode"))
        return []

    real = slca_module.fit, prompts_module.fit
    slca_module.fit = prompts_module.fit = capture  # build the task's step and optimizer, do not train
    try:
        m.begin_task(task)
        m.train_task(task)
    finally:
        slca_module.fit, prompts_module.fit = real
    if captured.get("train_mode") is not None:
        captured["train_mode"]()
    return m, task, captured


def time_train(captured, x, y) -> float:
    step, opt = captured["step"], captured["optimizer"]
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = step(x, y)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def time_predict(m, task, x) -> float:
    from clcli.methods.base import EvalBatch

    queries = getattr(m, "queries", None)
    if queries is not None:
        m.queries = None  # compute the query, as on a test set's first evaluation
    t0 = time.perf_counter()
    with torch.inference_mode():
        m.predict(EvalBatch(x, task, range(0, task.num_classes)))
    dt = time.perf_counter() - t0
    if queries is not None:
        m.queries = queries
    return dt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img", type=int, default=112)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))

    built = {name: build(name, args) for name in METHODS}
    torch.manual_seed(1)
    x = torch.rand(args.batch, 3, args.img, args.img)
    train: dict[str, list[float]] = {n: [] for n in METHODS}
    infer: dict[str, list[float]] = {n: [] for n in METHODS}
    for m, task, captured in built.values():  # warm-up
        y = torch.randint(task.labels.start, task.labels.stop, (args.batch,))
        time_train(captured, x, y)
        time_predict(m, task, x)
    for _ in range(args.rounds):
        for name, (m, task, captured) in built.items():
            y = torch.randint(task.labels.start, task.labels.stop, (args.batch,))
            train[name].append(statistics.median(time_train(captured, x, y) for _ in range(args.steps)))
            infer[name].append(statistics.median(time_predict(m, task, x) for _ in range(args.steps)))
    tokens = (args.img // args.patch) ** 2 + 1
    print(f"CPU, {args.threads} thread(s), torch {torch.__version__}; random ViT {args.img} px / patch {args.patch} "
          f"({tokens} tokens), width {args.dim}, depth {args.depth}, {args.heads} heads; batch {args.batch}; median of "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'method':<12} {'train step ms':>14} {'vs SLCA':>8} {'predict ms':>11} {'vs SLCA':>8}  trainable prompt params")
    base_t, base_i = statistics.median(train["slca"]), statistics.median(infer["slca"])
    for name, (m, _, _) in built.items():
        t, i = statistics.median(train[name]), statistics.median(infer[name])
        params = m.summary().get("trainable_prompt_parameters", "-") if name != "slca" else "- (full backbone)"
        print(f"{name:<12} {1000 * t:>14.1f} {t / base_t:>8.2f} {1000 * i:>11.1f} {i / base_i:>8.2f}  {params}")
    prompt_steps = [statistics.median(train[n]) for n in METHODS if n != "slca"]
    print("last line, as the other benchmark scripts: SLCA's training step / the prompt methods' mean step")
    print(f"ratio: {base_t / statistics.mean(prompt_steps):.2f}")


if __name__ == "__main__":
    main()
