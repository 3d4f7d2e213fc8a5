"""The training loop: activations -> SAE -> recon + λ·L1 + τ·penalty -> AdamW -> renorm -> τ update.

Loss per batch of B tokens (x scaled so E||x|| = 1, see TrainConfig):
    recon   = mean_b ||x_b − x̂_b||²                      (sum over d, mean over the batch)
    l1      = mean_b ||f_b||₁                             (decoder rows are unit norm)
    penalty = TopKOrthoLoss(f)                            (Σ |C_ij| over the top-k pairs, C = fᵀf / B:
                                                           per token like the other two terms)
    loss    = recon + λ·l1 + τ·penalty
τ follows AdaptiveTau; with no --tau-target, L_target = mean recon over the warm-up steps
(logged as `tau_target` in metrics.jsonl and summary.json).

Data (bounded memory, aosae/data): the rank's activations live in a disk store (collected on first
use, reused by later runs) or come from the LM as it runs (--streaming); batches are drawn from a
MixingBuffer whose position is a function of the step, so a resume is bitwise exact.

Run directory: cfg.json + sae_weights.safetensors (final SAE, folded back to raw activation
scale: b_enc and b_dec divided by the scale, decoder rows still unit norm), train_config.json,
metrics.jsonl, checkpoints/step_<N>/ (the newest --keep-checkpoints plus the final; see
checkpoints.py), summary.json, report.md + report.png.
"""
from __future__ import annotations

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

from aosae.data.language_models import DEFAULT_MODEL, hook_name
from aosae.data.mixing import MixingBuffer, TensorSource
from aosae.data.sources import ActivationSpec, held_out_count, open_store, training_rows
from aosae.data.text import DEFAULT_DATASET
from aosae.eval.metrics import ReconstructionStats
from aosae.files import tensors_sha256, write_json, write_json_atomically
from aosae.nn.loss import TopKOrthoLoss
from aosae.nn.sae import SAEConfig, SparseAutoencoder
from aosae.nn.tau import AdaptiveTau
from aosae.training import checkpoints as ckpts
from aosae.training import distributed as ddp
from aosae.training.checkpoints import folded_sae
from aosae.training.config import TrainConfig
from aosae.training.logging import make_logger
from aosae.training.resume_checks import check_checkpoints_kept, check_config_fits_checkpoints, check_log_covers
from aosae.training.optimizer import make_optimizer
from aosae.training.step import SAEObjective

EVAL_TOKENS = 8192
EVAL_CHUNK = 4096
SCALE_TOKENS = 65_536  # rows of the first buffer group that set the activation scale


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf on some rank; every rank stops, the last good checkpoint is kept."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def get_activations(cfg: TrainConfig, info: ddp.DistInfo, device: str, progress: bool) -> tuple[torch.Tensor, dict]:
    """This rank's activations [N, d_in] float32 in RAM, from its store (built if missing).

    For callers that want them all at once (ablation arms at small budgets); training itself
    reads the store through a MixingBuffer and never holds it whole."""
    store = open_store(ActivationSpec.from_config(cfg, info.rank, info.world_size), device, progress)
    return store.read(0, store.n_tokens).float(), store.meta


class Trainer:
    """One run: build everything from a TrainConfig, then `run()`; `Trainer.resume(run_dir)` continues one.

    `activations` (a tensor [N, d_in]) replaces the store: the ablation's arms share one set in RAM."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Optional[str | os.PathLike] = None,
        *,
        progress: bool = True,
        activations: Optional[torch.Tensor] = None,
        write_config: bool = True,
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
        # train_config.json before collecting, so that a run killed during collection can be --resume'd;
        # a start that fails (a bad model, layer or dataset) puts back what the directory held
        undo = self._write_train_config() if self.info.is_main and write_config else None
        try:
            self._build(cfg, activations, progress)
        except Exception:
            if undo is not None:
                undo()
            raise
        self._undo_start = undo  # run() still undoes the start if the first step fails

    def _write_train_config(self) -> Callable[[], None]:
        """Write run_dir/train_config.json atomically; returns what undoes it (the previous file, or none)."""
        path = self.run_dir / "train_config.json"
        created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = path.read_bytes() if path.is_file() else None
        write_json_atomically(path, self.cfg.to_dict())

        def undo() -> None:
            if previous is None:
                path.unlink(missing_ok=True)
                if created:
                    try:
                        self.run_dir.rmdir()  # only when nothing else was written there
                    except OSError:
                        pass
            else:
                tmp = path.with_name(path.name + ".restore")
                tmp.write_bytes(previous)
                os.replace(tmp, path)

        return undo

    def _build(self, cfg: TrainConfig, activations: Optional[torch.Tensor], progress: bool) -> None:
        if activations is None:
            spec = ActivationSpec.from_config(cfg, self.info.rank, self.info.world_size)
            train_rows, self.eval_acts, first, self.data_meta = training_rows(
                spec, cfg.streaming, EVAL_TOKENS, self.device, progress and self.info.is_main)
        else:  # given by the caller (ablation arms share one set)
            n_eval = held_out_count(activations.shape[0], EVAL_TOKENS)
            first = activations.shape[0] - n_eval
            train_rows, self.eval_acts = TensorSource(activations[:first]), activations[first:]
            self.data_meta = {"source": "given tensor"}
        # which tokens the summary is measured on, so `aosae eval` can run the LM over the same text
        self.held_out = {"first_token": first, "tokens": self.eval_acts.shape[0], "world_size": self.info.world_size}
        self.buffer = MixingBuffer(train_rows, cfg.batch_size, cfg.buffer_tokens, seed=cfg.seed)
        d_in = train_rows.d
        first_rows = self.buffer.first_rows(SCALE_TOKENS)
        norm = torch.cat([c.float().norm(dim=1) for c in first_rows.split(8192)]).mean().item()
        if cfg.normalize_activations and not (np.isfinite(norm) and norm > 0):  # the scale would be NaN/Inf
            source = self.data_meta.get("source") or f"the activations of layer {cfg.layer}"
            raise ValueError(f"the mean activation norm of the first {first_rows.shape[0]} training rows is {norm} "
                             f"({source}): activations must be finite and not all zero; check the model and the "
                             "dataset (or delete the activation store to collect it again)")
        # one scale for all ranks so their weights stay identical
        scale = torch.tensor([1.0 / norm], dtype=torch.float64)
        self.scale = float(ddp.all_reduce_mean(scale, self.info)) if cfg.normalize_activations else 1.0

        d_sae = cfg.d_sae or d_in
        if d_sae < 2:
            raise ValueError(f"d_sae would be {d_sae} (d_in of layer {cfg.layer}): an SAE needs at least two latents; "
                             "pass --d-sae 2 or more")
        if cfg.activation in ("topk", "batchtopk") and cfg.top_k > d_sae:
            raise ValueError(f"top_k={cfg.top_k} exceeds d_sae={d_sae}")
        sae_cfg = SAEConfig(
            d_in=d_in, d_sae=d_sae, activation=cfg.activation, top_k=cfg.top_k, model_name=cfg.model or DEFAULT_MODEL,
            hook_layer=cfg.layer, hook_name=hook_name(cfg.layer), context_size=cfg.context,
            extra={"l1": cfg.l1, "fraction": cfg.fraction, "similarity": cfg.similarity, "ortho": cfg.ortho,
                   "dataset": cfg.dataset or DEFAULT_DATASET, "tokens": cfg.tokens},
        )
        self.sae = SparseAutoencoder(sae_cfg, generator=torch.Generator().manual_seed(cfg.seed))
        # the first 4096 training rows in source order (b_dec init, BudgetTau's variance; the ablation relies on it)
        head = first_rows if not self.buffer.shuffle_chunks else train_rows.read(0, min(4096, train_rows.n_tokens))
        sample = head[:4096].float() * self.scale
        self.sae.init_b_dec_(sample)
        with torch.no_grad():
            self.sae.b_dec.copy_(ddp.all_reduce_mean(self.sae.b_dec.detach(), self.info))
        self.sae.to(self.device)
        self.opt = make_optimizer(self.sae.parameters(), cfg.lr)
        warm = cfg.warmup
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        from aosae.nn.penalties import RedundancyPenalty
        from aosae.nn.tau import BudgetTau, budget_from_run

        if not cfg.ortho:
            self.ortho = None
        elif cfg.penalty == "coactivation" and cfg.pair_rule == "all":  # the paper's penalty
            self.ortho = TopKOrthoLoss(cfg.fraction, similarity=cfg.similarity, scale=cfg.ortho_scale, backend=cfg.backend)
        else:
            self.ortho = RedundancyPenalty(cfg.penalty, cfg.fraction, similarity=cfg.similarity,
                                           pair_rule=cfg.pair_rule, backend=cfg.backend)
        if cfg.tau_rule == "budget":  # FVU = recon / E‖x − E x‖² on the scaled activations
            variance = float((sample - sample.mean(0)).pow(2).sum(-1).mean())
            budget = cfg.tau_budget if cfg.tau_budget_run is None else budget_from_run(cfg.tau_budget_run, cfg.tau_slack, variance)
            self.tau = BudgetTau(cfg.tau_init, cfg.tau_min, cfg.tau_max, budget=budget, variance=variance,
                                 gain=cfg.tau_gain, hold_steps=warm)
        else:
            self.tau = AdaptiveTau(cfg.tau_init, cfg.tau_min, cfg.tau_max, target=cfg.tau_target, calibration_steps=warm)
        self.objective = SAEObjective(self.sae, self.opt, self.sched, cfg.l1, self.ortho, self.tau)
        self.step = 0

    # ----------------------------------------------------------------- checkpoints (checkpoints.py)
    def checkpoint_dir(self, step: int) -> Path:
        return ckpts.checkpoint_dir(self.run_dir, step)

    def write_checkpoint(self) -> Path:
        """Write checkpoints/step_<N> atomically, then prune to the newest keep_checkpoints + the final."""
        path = ckpts.write_checkpoint(self)
        ckpts.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints, self.cfg.steps)
        return path

    @staticmethod
    def latest_checkpoint(run_dir: Path) -> Optional[Path]:
        return ckpts.latest_checkpoint(Path(run_dir))

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, progress: bool = True, steps: Optional[int] = None) -> "Trainer":
        """Continue a run from its newest usable checkpoint (exactly: same batches, same state).

        A damaged newest checkpoint is skipped with a CheckpointWarning naming it; if every
        checkpoint is damaged, NoUsableCheckpoint. A run killed before its first checkpoint
        starts over (its activation store, complete or not, is reused); one that has trained but
        lost its checkpoints is refused (check_checkpoints_kept). `steps`: train to this
        many steps in all instead of the run's own (at least the steps done; the warm-up stays
        the run's). Nothing in the run directory is written until run().

        Refused (BadFile naming the file, nothing changed) when train_config.json no longer fits
        the checkpoints' SAE (edited after the run started), or when metrics.jsonl lacks the steps
        the checkpoint has done (the report would silently lose them)."""
        from aosae.files import MissingFile

        run_dir = Path(run_dir)
        cfg_path = run_dir / "train_config.json"
        if not cfg_path.is_file():
            raise MissingFile(cfg_path, "does not exist, so this is not a run directory",
                              "pass the --out directory of an earlier `aosae train`")
        d = json.loads(cfg_path.read_text())
        cfg = TrainConfig.from_dict(d)
        check_config_fits_checkpoints(run_dir, cfg)
        check_checkpoints_kept(run_dir)
        if steps is not None and steps != cfg.steps:
            # the warm-up (and AdaptiveTau's calibration) is a function of the steps: keep the run's own
            cfg = TrainConfig.from_dict({**cfg.to_dict(), "steps": steps, "warmup_steps": cfg.warmup})
        trainer = cls(cfg, run_dir, progress=progress, write_config=False)
        try:
            ckpts.load_latest_good(trainer)
            if trainer.step > cfg.steps and steps is not None:
                raise ValueError(f"--steps {cfg.steps} is fewer than the {trainer.step} steps {run_dir} has done: pass "
                                 f"--steps {trainer.step} or more to train it further, or leave --steps out to finish it")
            if trainer.step > cfg.steps:  # the user gave no --steps: the run's own file says fewer (edited?)
                raise ValueError(f"{cfg_path}'s steps ({cfg.steps}) is fewer than the {trainer.step} steps {run_dir} has "
                                 f"done (edited?): pass --steps {trainer.step} or more to train it further, or put "
                                 "back the steps it had")
            check_log_covers(run_dir / "metrics.jsonl", trainer.step)
        except BaseException:
            trainer.buffer.close()  # its prefetch thread: run() would have closed it
            raise
        return trainer

    # ----------------------------------------------------------------- the loop
    def run(self, on_step: Optional[Callable[["Trainer"], None]] = None) -> dict:
        """Train until cfg.steps; returns the summary dict (also written to summary.json by rank 0)."""
        cfg, main = self.cfg, self.info.is_main
        metrics_path = self.run_dir / "metrics.jsonl"
        fresh = main and self.step == 0 and self.latest_checkpoint(self.run_dir) is None \
            and getattr(self, "_undo_start", None) is not None
        self._fresh = fresh  # a divergence at the very first step then keeps nothing (see _train_step)
        made = {"metrics": not metrics_path.exists(), "checkpoints": not (self.run_dir / "checkpoints").exists()}
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomically(self.run_dir / "train_config.json", cfg.to_dict())  # a resume's --steps too
            self._truncate_metrics(metrics_path)
            if self.step == 0 and self.latest_checkpoint(self.run_dir) is None:
                self.write_checkpoint()  # step 0: the NaN guard always has a good state to fall back to
        try:
            return self._run(on_step, metrics_path, main)
        except Exception as err:
            if fresh and self.step == 0:
                # a start that fails before its first step must not block a retry (step_0 is only the init)
                self._undo_failed_start(metrics_path, made)
            raise

    def _undo_failed_start(self, metrics_path: Path, made: dict) -> None:
        """Remove what this start created (step_0, the log, train_config.json, the directory), nothing else."""
        shutil.rmtree(self.checkpoint_dir(0), ignore_errors=True)
        if made["checkpoints"]:
            try:
                (self.run_dir / "checkpoints").rmdir()  # only if nothing else is there
            except OSError:
                pass
        if made["metrics"]:
            metrics_path.unlink(missing_ok=True)
        self._undo_start()

    def _run(self, on_step, metrics_path: Path, main: bool) -> dict:
        cfg = self.cfg
        logger = make_logger(cfg.log if main else None, self.run_dir, cfg.to_dict())
        bar = None
        if self.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        try:
            with open(metrics_path, "a") if main else open(os.devnull, "w") as log:
                while self.step < cfg.steps:
                    row = self._train_step()
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    logger.log(row)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}", tau=f"{self.tau.tau:.3g}")
                    if main and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                        self.write_checkpoint()
                    if on_step is not None:
                        on_step(self)
        finally:
            if bar is not None:
                bar.close()
            logger.close()
            self.buffer.close()
        summary = self.finish()
        # no step follows: the last gradients and the memory kept for the next step's go
        self.opt.zero_grad(set_to_none=True)
        self.sae.release_kept_memory()
        return summary

    def _train_step(self) -> dict:
        """One optimiser step on batch self.step; returns its metrics row (rank-averaged)."""
        cfg = self.cfg
        params = list(self.sae.parameters())
        x = self.buffer.batch(self.step).to(self.device) * self.scale
        step = self.objective.losses(x)
        loss, recon, l1, penalty = step.loss, step.recon, step.l1, step.penalty
        # every rank learns whether all are finite before any steps: all stop together or none does
        if not ddp.all_finite(bool(torch.isfinite(loss)), self.info):
            last = self.latest_checkpoint(self.run_dir)
            where = "" if not self.info.enabled else f" on rank {self.info.rank}" if not torch.isfinite(loss) \
                else f" on another rank (rank {self.info.rank} was finite)"
            what = (f"The last good checkpoint is {last}. Lower --lr, check the activations for NaN/Inf, or "
                    "resume with --resume.")
            if self.step == 0 and getattr(self, "_fresh", False):  # run() removes the start: nothing to resume
                what = (f"Nothing was kept in {self.run_dir} (it diverged at its first step): lower --lr or check "
                        "the activations for NaN/Inf, then run the same command again.")
            raise TrainingDiverged(
                f"loss is {loss.item()}{where} at step {self.step} (recon={recon.item()}, l1={l1.item()}, "
                f"penalty={penalty.item()}); stopped. {what}"
            )
        self.objective.optimizer_step(loss, reduce_grads=lambda: ddp.all_reduce_grads(params, self.info))
        extra = {}
        if cfg.activation == "batchtopk":  # one inference threshold for all ranks (each saw its own batch)
            with torch.no_grad():
                self.sae.threshold.copy_(ddp.all_reduce_mean(self.sae.threshold.detach().clone(), self.info))
            extra["threshold"] = float(self.sae.threshold)
        stats = ddp.all_reduce_mean(
            torch.stack([loss.detach(), recon.detach(), l1.detach(), penalty.detach(),
                         step.l0()]).float().cpu(), self.info).tolist()
        tau_used = self.tau.tau
        if not cfg.fixed_tau:
            self.tau.update(stats[1])
        self.step += 1
        epoch = self.buffer.position(self.step)[0]
        return {"step": self.step, "loss": stats[0], "recon": stats[1], "l1": stats[2], "penalty": stats[3],
                "tau": tau_used, "next_tau": self.tau.tau, "tau_target": self.tau.target, "l0": stats[4],
                "lr": self.sched.get_last_lr()[0], "tokens": self.step * cfg.batch_size * self.info.world_size,
                "epoch": epoch, **extra}

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
        LM over the same text by default, so its numbers match these. A BatchTopK SAE is measured
        as it is used and saved: with its inference threshold (JumpReLU), not the batch's top B·k."""
        sae = folded_sae(self.sae, self.scale).to(self.device)
        stats = ReconstructionStats()
        for x in self.eval_acts.split(EVAL_CHUNK):
            x = x.to(self.device)
            out = sae(x)
            stats.update(x, out.x_hat, out.sparse)  # the kept entries, never a dense [B, d_sae]
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

    def finish(self) -> dict:
        summary = self.evaluate()
        # the final SAE at raw scale, folded once: its sha256 is the checksum sae_weights.safetensors
        # records (aosae.files.tensors_sha256), so `aosae eval` can tell a summary.json of other weights;
        # the same on every rank
        final = folded_sae(self.sae, self.scale)
        digest = tensors_sha256(final.state_tensors())
        if self.info.enabled:
            import torch.distributed as dist

            digests = [None] * self.info.world_size
            dist.all_gather_object(digests, digest)
            summary["rank_weight_digests"] = digests
            if len(set(digests)) != 1:
                raise RuntimeError(f"ranks ended with different weights: {digests}")
        summary["weights_sha256"], summary["weights_file"] = digest, "sae_weights.safetensors"
        if self.info.is_main:
            # the run dir itself cannot be swapped atomically (it holds everything), so each file is
            tmp = Path(tempfile.mkdtemp(prefix=".final.tmp", dir=self.run_dir))
            final.write_files(tmp)
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
        density = latent_density(sae(self.eval_acts.to(self.device)).sparse)
        try:
            write_report(self.run_dir, sae=sae, density=density)
        except ImportError as err:  # matplotlib is an optional dependency: every other output is written
            import warnings

            warnings.warn(f"no report.png: {err} (pip install matplotlib); report.md, summary.json and the weights are written",
                          stacklevel=2)


def train(cfg: TrainConfig, run_dir=None, *, progress: bool = True, on_step=None) -> tuple[Path, dict]:
    """Train from scratch; returns (run_dir, summary)."""
    trainer = Trainer(cfg, run_dir, progress=progress)
    return trainer.run_dir, trainer.run(on_step)

