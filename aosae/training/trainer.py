"""The training loop: activations -> SAE -> recon + λ·L1 + τ·penalty -> AdamW -> renorm -> τ update.

Loss per batch of B tokens (x scaled so E||x|| = 1, see TrainConfig):
    recon   = mean_b ||x_b − x̂_b||²                      (sum over d, mean over the batch)
    l1      = mean_b ||f_b||₁                             (decoder rows are unit norm)
    penalty = TopKOrthoLoss(f) / B                        (Σ |C_ij| over the top-k pairs, C = fᵀf,
                                                           per token like the other two terms)
    loss    = recon + λ·l1 + τ·penalty
τ follows AdaptiveTau; with no --tau-target, L_target = mean recon over the warm-up steps
(logged as `tau_target` in metrics.jsonl and summary.json).

Run directory: cfg.json + sae_weights.safetensors (final SAE, folded back to raw activation
scale: b_enc and b_dec divided by the scale, decoder rows still unit norm), train_config.json,
metrics.jsonl, checkpoints/step_<N>/, summary.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from aosae.training import distributed as ddp
from aosae.data.activations import ActivationBuffer, cache_key, collect_activations, load_cache, save_cache
from aosae.training.config import TrainConfig
from aosae.training.step import SAEObjective
from aosae.data.text import DEFAULT_DATASET, iter_texts
from aosae.eval.metrics import ReconstructionStats
from aosae.nn.loss import TopKOrthoLoss
from aosae.nn.tau import AdaptiveTau
from aosae.data.language_models import DEFAULT_MODEL, cache_root, check_layer, hook_name, load_model
from aosae.files import fsync_path, write_dir_atomically, write_json
from aosae.nn.sae import WEIGHT_KEYS, SAEConfig, SparseAutoencoder

EVAL_TOKENS = 8192
EVAL_CHUNK = 4096


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def get_activations(cfg: TrainConfig, info: ddp.DistInfo, device: str, progress: bool) -> tuple[torch.Tensor, dict]:
    """This rank's activations [N, d_in] float32 on CPU, from the cache or by running the LM."""
    key_fields = dict(
        model=cfg.model or DEFAULT_MODEL, layer=cfg.layer, dataset=cfg.dataset or DEFAULT_DATASET,
        tokens=cfg.tokens, context=cfg.context, rank=info.rank, world=info.world_size, lm_dtype=cfg.dtype,
    )
    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "activations"
    directory = root / cache_key(**key_fields)
    acts = load_cache(directory)
    if acts is not None:
        meta = json.loads((directory / "meta.json").read_text())
        if not 0 <= cfg.layer < meta["n_layers"]:
            raise ValueError(f"layer must be in [0, {meta['n_layers'] - 1}], got {cfg.layer}")
        return acts, meta
    model, tokenizer = load_model(cfg.model, device=device, dtype=getattr(torch, cfg.dtype))
    n_layers = check_layer(model, cfg.layer)
    check_memory_for(cfg.tokens, model.config.hidden_size)
    acts = collect_activations(
        model, tokenizer, iter_texts(cfg.dataset), cfg.layer, cfg.tokens, context=cfg.context,
        lm_batch=cfg.lm_batch, device=device, rank=info.rank, world_size=info.world_size, progress=progress,
    )
    meta = {**key_fields, "n_layers": n_layers, "model_type": model.config.model_type}
    del model
    save_cache(directory, acts, meta)
    return acts, meta


def check_memory_for(tokens: int, d_model: int) -> None:
    """Activations are held in RAM as float32: refuse up front (instead of being killed by
    the OOM killer hours into collection) when they cannot fit."""
    need = tokens * d_model * 4
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return
    if need > 0.8 * total:
        raise ValueError(
            f"--tokens {tokens:,} activations of width {d_model} need {need / 2**30:.1f} GiB of RAM as "
            f"float32, more than 80% of this machine's {total / 2**30:.1f} GiB: lower --tokens"
        )


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    plain = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, plain


def _set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = plain["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def folded_sae(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """The same SAE for raw activations x, when it was trained on x·s.

    relu((x·s − b_dec)W_enc + b_enc)/s = relu((x − b_dec/s)W_enc + b_enc/s), so with b_enc/s and b_dec/s
    the latents are f/s and the reconstruction is x̂/s; W_enc and W_dec (unit-norm rows) are unchanged."""
    out = SparseAutoencoder(SAEConfig(**{**sae.cfg.__dict__, "extra": {**sae.cfg.extra, "activation_scale": scale}}))
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc)
        out.W_dec.copy_(sae.W_dec)
        out.b_enc.copy_(sae.b_enc / scale)
        out.b_dec.copy_(sae.b_dec / scale)
    return out


class Trainer:
    """One run: build everything from a TrainConfig, then `run()`; `Trainer.resume(run_dir)` continues one."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Optional[str | os.PathLike] = None,
        *,
        progress: bool = True,
        activations: Optional[torch.Tensor] = None,
    ):
        self.cfg = cfg
        self.progress = progress
        self.device = resolve_device(cfg.device)
        self.info = ddp.init(self.device)
        self.device = ddp.device_for(self.device, self.info)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir or cfg.out or f"runs/{(cfg.model or DEFAULT_MODEL).replace('/', '_')}-L{cfg.layer}-{stamp}")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)

        if activations is None:
            acts, _ = get_activations(cfg, self.info, self.device, progress and self.info.is_main)
        else:  # given by the caller (ablation arms share one set)
            acts = activations
        n_eval = min(EVAL_TOKENS, acts.shape[0] // 10)
        self.eval_acts, train_acts = acts[acts.shape[0] - n_eval :], acts[: acts.shape[0] - n_eval]
        # which tokens the summary is measured on, so `aosae eval` can run the LM over the same text
        self.held_out = {"first_token": acts.shape[0] - n_eval, "tokens": n_eval, "world_size": self.info.world_size}
        self.buffer = ActivationBuffer(train_acts, cfg.batch_size, seed=cfg.seed)
        d_in = acts.shape[1]
        # one scale for all ranks so their weights stay identical
        scale = torch.tensor([1.0 / train_acts.norm(dim=1).mean().item()], dtype=torch.float64)
        self.scale = float(ddp.all_reduce_mean(scale, self.info)) if cfg.normalize_activations else 1.0

        d_sae = cfg.d_sae or d_in
        if cfg.activation == "topk" and cfg.top_k > d_sae:
            raise ValueError(f"top_k={cfg.top_k} exceeds d_sae={d_sae}")
        sae_cfg = SAEConfig(
            d_in=d_in, d_sae=d_sae, activation=cfg.activation, top_k=cfg.top_k, model_name=cfg.model or DEFAULT_MODEL,
            hook_layer=cfg.layer, hook_name=hook_name(cfg.layer), context_size=cfg.context,
            extra={"l1": cfg.l1, "fraction": cfg.fraction, "similarity": cfg.similarity, "ortho": cfg.ortho,
                   "dataset": cfg.dataset or DEFAULT_DATASET, "tokens": cfg.tokens},
        )
        self.sae = SparseAutoencoder(sae_cfg, generator=torch.Generator().manual_seed(cfg.seed))
        sample = train_acts[: min(4096, train_acts.shape[0])] * self.scale
        self.sae.init_b_dec_(sample)
        with torch.no_grad():
            self.sae.b_dec.copy_(ddp.all_reduce_mean(self.sae.b_dec.detach(), self.info))
        self.sae.to(self.device)
        self.opt = torch.optim.AdamW(self.sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
        warm = cfg.warmup
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.ortho = TopKOrthoLoss(cfg.fraction, similarity=cfg.similarity, backend=cfg.backend) if cfg.ortho else None
        self.tau = AdaptiveTau(cfg.tau_init, cfg.tau_min, cfg.tau_max, target=cfg.tau_target, calibration_steps=warm)
        self.objective = SAEObjective(self.sae, self.opt, self.sched, cfg.l1, self.ortho, self.tau)
        self.step = 0

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step_{step}"

    def write_checkpoint(self) -> Path:
        """Atomically write checkpoints/step_<N>: written into a temp dir, fsync'd, renamed."""
        return write_dir_atomically(self.checkpoint_dir(self.step), self._write_checkpoint_files)

    def _write_checkpoint_files(self, d: Path) -> None:
        folded_sae(self.sae, self.scale).write_files(d)  # loadable SAE (raw activation scale)
        save_file(self.sae.state_tensors(), str(d / "train_weights.safetensors"))
        fsync_path(d / "train_weights.safetensors")
        torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}, d / "optimizer.pt")
        fsync_path(d / "optimizer.pt")
        rng_tensors, rng_plain = _rng_state()
        save_file(rng_tensors, str(d / "rng.safetensors"))
        epoch, offset = self.buffer.position(self.step)
        kth = self.ortho._kth if self.ortho is not None else None
        write_json(d / "state.json", {
            "step": self.step, "scale": self.scale, "tau": self.tau.state_dict(), "rng": rng_plain,
            "data_position": {"epoch": epoch, "offset": offset},
            "ortho_kth": None if kth is None else float(kth),
        })

    def load_checkpoint(self, d: Path) -> None:
        state = json.loads((d / "state.json").read_text())
        tensors = load_file(str(d / "train_weights.safetensors"))
        with torch.no_grad():
            for name in WEIGHT_KEYS:
                getattr(self.sae, name).copy_(tensors[name])
        opt_state = torch.load(d / "optimizer.pt", weights_only=True, map_location=self.device)
        self.opt.load_state_dict(opt_state["optimizer"])
        self.sched.load_state_dict(opt_state["scheduler"])
        self.tau.load_state_dict(state["tau"])
        self.scale = state["scale"]
        if self.ortho is not None and state["ortho_kth"] is not None:
            self.ortho._kth = torch.tensor(state["ortho_kth"], device=self.device)
        _set_rng_state(load_file(str(d / "rng.safetensors")), state["rng"])
        self.step = state["step"]

    @staticmethod
    def latest_checkpoint(run_dir: Path) -> Optional[Path]:
        ckpts = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / "state.json").is_file()]
        return max(ckpts, key=lambda p: int(p.name.split("_")[1]), default=None)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, progress: bool = True, steps: Optional[int] = None) -> "Trainer":
        """Continue a run from its latest complete checkpoint (exactly: same batches, same state)."""
        run_dir = Path(run_dir)
        cfg_path = run_dir / "train_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no train_config.json)")
        d = json.loads(cfg_path.read_text())
        if steps is not None:
            d["steps"] = steps
        trainer = cls(TrainConfig.from_dict(d), run_dir, progress=progress)
        ckpt = cls.latest_checkpoint(run_dir)
        if ckpt is not None:
            trainer.load_checkpoint(ckpt)
        return trainer

    # ----------------------------------------------------------------- the loop
    def run(self, on_step: Optional[Callable[["Trainer"], None]] = None) -> dict:
        """Train until cfg.steps; returns the summary dict (also written to summary.json by rank 0)."""
        cfg, main = self.cfg, self.info.is_main
        metrics_path = self.run_dir / "metrics.jsonl"
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "train_config.json", cfg.to_dict())
            self._truncate_metrics(metrics_path)
            if self.step == 0 and self.latest_checkpoint(self.run_dir) is None:
                self.write_checkpoint()  # step 0: the NaN guard always has a good state to fall back to
        bar = None
        if self.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        params = list(self.sae.parameters())
        with open(metrics_path, "a") if main else open(os.devnull, "w") as log:
            while self.step < cfg.steps:
                x = self.buffer.batch(self.step).to(self.device) * self.scale
                loss, recon, l1, penalty, f = self.objective.losses(x)
                if not torch.isfinite(loss):
                    last = self.latest_checkpoint(self.run_dir)
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {self.step} (recon={recon.item()}, l1={l1.item()}, "
                        f"penalty={penalty.item()}); stopped. The last good checkpoint is {last}. "
                        "Lower --lr, check the activations for NaN/Inf, or resume with --resume."
                    )
                self.objective.optimizer_step(loss, reduce_grads=lambda: ddp.all_reduce_grads(params, self.info))
                stats = ddp.all_reduce_mean(
                    torch.stack([loss.detach(), recon.detach(), l1.detach(), penalty.detach(),
                                 (f > 0).sum(-1).float().mean()]).float().cpu(), self.info).tolist()
                tau_used = self.tau.tau
                if not cfg.fixed_tau:
                    self.tau.update(stats[1])
                self.step += 1
                epoch, offset = self.buffer.position(self.step)
                row = {"step": self.step, "loss": stats[0], "recon": stats[1], "l1": stats[2], "penalty": stats[3],
                       "tau": tau_used, "next_tau": self.tau.tau, "tau_target": self.tau.target, "l0": stats[4],
                       "lr": self.sched.get_last_lr()[0], "tokens": self.step * cfg.batch_size * self.info.world_size,
                       "epoch": epoch}
                log.write(json.dumps(row) + "\n")
                log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats[0]:.4g}", l0=f"{stats[4]:.1f}", tau=f"{self.tau.tau:.3g}")
                if main and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.write_checkpoint()
                if on_step is not None:
                    on_step(self)
        if bar is not None:
            bar.close()
        return self.finish()

    def _truncate_metrics(self, path: Path) -> None:
        """On resume, drop log lines past the checkpoint (a killed run may have logged them)."""
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in keep))

    # ----------------------------------------------------------------- the end
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out metrics on raw activations, under SAEBench's names (aosae.eval.metrics):
        the last EVAL_TOKENS tokens collected, never trained on. `aosae eval RUN` re-runs the
        LM over the same text by default, so its numbers match these."""
        sae = folded_sae(self.sae, self.scale).to(self.device)
        stats = ReconstructionStats()
        for x in self.eval_acts.split(EVAL_CHUNK):
            x = x.to(self.device)
            out = sae(x)
            stats.update(x, out.x_hat, out.latents)
        res = stats.result()
        return {
            **res,
            "dead_latents": round(res["dead_fraction"] * sae.d_sae),
            "d_sae": sae.d_sae,
            "final_tau": self.tau.tau,
            "tau_target": self.tau.target,
            "held_out": self.held_out,
            "steps": self.step,
        }

    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for name in WEIGHT_KEYS:
            h.update(getattr(self.sae, name).detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def finish(self) -> dict:
        summary = self.evaluate()
        digest = self.weights_digest()
        if self.info.enabled:
            import torch.distributed as dist

            digests = [None] * self.info.world_size
            dist.all_gather_object(digests, digest)
            summary["rank_weight_digests"] = digests
            if len(set(digests)) != 1:
                raise RuntimeError(f"ranks ended with different weights: {digests}")
        summary["weights_sha256"] = digest
        if self.info.is_main:
            # the run dir itself cannot be swapped atomically (it holds everything), so each file is
            tmp = Path(tempfile.mkdtemp(prefix=".final.tmp", dir=self.run_dir))
            folded_sae(self.sae, self.scale).write_files(tmp)
            for name in ("sae_weights.safetensors", "cfg.json"):
                os.replace(tmp / name, self.run_dir / name)
            shutil.rmtree(tmp, ignore_errors=True)
            write_json(self.run_dir / "summary.json", summary)
            self.write_report()
        ddp.barrier(self.info)
        return summary

    @torch.no_grad()
    def write_report(self) -> None:
        """report.md + report.png: loss curves, L0 and τ over steps, latent density."""
        from aosae.eval.metrics import latent_density
        from aosae.eval.report import write_report

        sae = folded_sae(self.sae, self.scale).to(self.device)
        density = latent_density(sae(self.eval_acts.to(self.device)).latents)
        try:
            write_report(self.run_dir, sae=sae, density=density)
        except ImportError as err:  # matplotlib is an optional dependency
            print(f"no report.png: {err} (pip install matplotlib)")


def train(cfg: TrainConfig, run_dir=None, *, progress: bool = True, on_step=None) -> tuple[Path, dict]:
    """Train from scratch; returns (run_dir, summary)."""
    trainer = Trainer(cfg, run_dir, progress=progress)
    return trainer.run_dir, trainer.run(on_step)

