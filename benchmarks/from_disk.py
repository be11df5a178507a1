"""QLoRA from a checkpoint on disk through the app's module and Lightning's Trainer (strategy="qlora"): issue 18.

    python benchmarks/from_disk.py DIR --seq 1024 --steps 3            # DIR written by ../shared/anchors/peft_from_disk.py
    python benchmarks/from_disk.py DIR --layers 8                      # only the first 8 blocks (per-layer points)

The same measurements as the anchor ``peft_from_disk.py run`` (one JSON line): device peak allocated over the load
and over load + steps, host peak anonymous and file-backed resident memory (mmapped shards are file-backed: page
cache), seconds from the start of loading to the end of the first step. LoRA r 16 on all linears, activation
checkpointing, AdamW, random token rows of ``--seq`` tokens, as the anchor does. Run it in its own process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK = {"anon": 0.0, "file": 0.0}


def _sample() -> None:
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                for key, tag in (("anon", "RssAnon:"), ("file", "RssFile:")):
                    if line.startswith(tag):
                        PEAK[key] = max(PEAK[key], int(line.split()[1]) / 2**20)
        time.sleep(0.1)


def _anon_now() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=None, help="build only the first N blocks of the checkpoint")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--trace-anon", action="store_true", help="host anonymous memory after each converted block")
    parser.add_argument("--no-prefetch", action="store_true", help="read each weight on the main thread (A/B)")
    parser.add_argument("--profile", default=None, help="write a cProfile of everything up to the first step here "
                        "(pstats file; the 25 largest cumulative entries go to stderr)")
    args = parser.parse_args()
    if args.no_prefetch:
        from lightning_qlora.quant.streaming import StreamedWeights

        StreamedWeights.prefetch = lambda self, names, device: None  # type: ignore[method-assign]
    threading.Thread(target=_sample, daemon=True).start()

    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from lightning_qlora import LoRAConfig, QLoRAPlugin, stream_pretrained
    from lightning_qlora.app.models import CausalLMFineTune

    class FirstBlocks(CausalLMFineTune):
        """The app's module, building only the first ``--layers`` blocks (the per-layer points of a wide model)."""

        def configure_model(self) -> None:
            if self.model is None:
                self.model = stream_pretrained(self.hparams.name_or_path, num_hidden_layers=args.layers)
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                self.model.enable_input_require_grads()

    cuda = args.accelerator == "gpu"
    trace: list[float] = []
    marks: dict[str, float] = {}
    # Wrap the recipe the plugin runs: when conversion starts and ends (the phases before the first step) and, with
    # --trace-anon, where host memory grows.
    import lightning_qlora.lightning.plugin as plugin_module

    recipe = plugin_module.iter_converted_blocks

    def traced(*a, **k):
        marks.setdefault("convert_start_s", time.time() - started)
        for piece in recipe(*a, **k):
            if args.trace_anon:
                trace.append(round(_anon_now(), 2))
            yield piece
        marks["convert_end_s"] = time.time() - started

    plugin_module.iter_converted_blocks = traced
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()

    class Clock(Callback):
        def on_train_start(self, trainer, pl_module):
            marks["load_peak"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            marks["anon_after_load"] = _anon_now()
            marks["loaded_s"] = time.time() - started

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if profiler is not None and "first_step_s" not in marks:
                profiler.disable()
            marks.setdefault("first_step_s", time.time() - started)
            marks.setdefault("losses", [])
            marks["losses"].append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    if cuda:
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the CUDA context, before the clock starts (the anchor's is made in its load)
    marks["anon_before_load"] = _anon_now()
    if profiler is not None:
        profiler.enable()
    started = time.time()
    kind = FirstBlocks if args.layers else CausalLMFineTune
    module = kind(name_or_path=args.dir, lr=1e-4, warmup_steps=0, gradient_checkpointing=True)
    marks["module_s"] = time.time() - started
    config = json.loads((Path(args.dir) / "config.json").read_text())
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, config["vocab_size"], (args.seq,), generator=generator) for _ in range(args.steps)]
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in rows]
    loader = DataLoader(data, batch_size=1)
    lora = LoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=0.05, init_lora_weights="default")
    trainer = Trainer(
        accelerator=args.accelerator, devices=1, strategy="qlora", plugins=[QLoRAPlugin(lora=lora)],
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Clock()],
    )
    marks["trainer_s"] = time.time() - started
    trainer.fit(module, train_dataloaders=loader)
    if profiler is not None:
        import pstats

        profiler.dump_stats(args.profile)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    print(json.dumps({
        "system": "lightning_qlora stream_pretrained + Trainer(strategy='qlora')", "dir": Path(args.dir).name,
        "layers": args.layers or config["num_hidden_layers"], "seq": args.seq, "rank": args.rank,
        "device_peak_load_gib": round(marks.get("load_peak", 0.0), 2),
        "device_peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "host_peak_anon_gib": round(PEAK["anon"], 2), "host_peak_file_gib": round(PEAK["file"], 2),
        "host_anon_before_load_gib": round(marks["anon_before_load"], 2),
        "host_anon_after_load_gib": round(marks.get("anon_after_load", 0.0), 2),
        "loaded_s": round(marks.get("loaded_s", 0.0), 1), "first_step_s": round(marks.get("first_step_s", 0.0), 1),
        "losses": marks.get("losses"), "prefetch": not args.no_prefetch,
        # Seconds from the clock's start: the module and the Trainer built, conversion's first and last block.
        "phases_s": {k: round(marks[k], 2) for k in ("module_s", "trainer_s", "convert_start_s", "convert_end_s",
                                                     "loaded_s", "first_step_s") if k in marks},
        **({"anon_per_block_gib": trace} if args.trace_anon else {}),
    }), flush=True)


if __name__ == "__main__":
    main()
