"""aosae dropped into SAELens's and dictionary_learning's own trainers, at its defaults, trains well.

Each test trains the library's plain arm and its aosae arm at the same settings (same data, batches,
seed, learning rate, sparsity) on synthetic activations with known features (correlated groups and a
hierarchy, aosae.data.synthetic), then measures on held-out tokens:

    explained variance  1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²            aosae arm within 0.05 of the plain arm
    selected mean |C|   mean |C_ij| over the top 0.5% pairs,     aosae arm lower
                        C = gᵀg / B on 1024 tokens, g = latents × decoder-row norms

Run with `-s` to print the measured rows (the README's table comes from them). CI runs 200 steps of
512 tokens, d_sae 256, k 8, on the data below; AOSAE_DROPIN_STEPS / _BATCH / _D_SAE / _K and
AOSAE_DROPIN_DATA (JSON fields of SyntheticConfig) run the same tests bigger or on other data.
"""
from __future__ import annotations

import json
import os
import queue

import pytest
import torch

from aosae import topk_ortho_loss
from aosae.data.synthetic import SyntheticConfig, generate

LR = 3e-3
K = int(os.environ.get("AOSAE_DROPIN_K", 8))  # TopK's active latents
STEPS = int(os.environ.get("AOSAE_DROPIN_STEPS", 200))
BATCH = int(os.environ.get("AOSAE_DROPIN_BATCH", 512))
D_SAE = int(os.environ.get("AOSAE_DROPIN_D_SAE", 256))
# d 64, 128 features: groups of 4 correlated features (ρ 0.5) and 4 parent/child hierarchies
DATA = SyntheticConfig(**{"d": 64, "n_features": 128, "correlation": 0.5,
                          **json.loads(os.environ.get("AOSAE_DROPIN_DATA", "{}"))})
D = DATA.d
EV_TOLERANCE = 0.05


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices this small gain nothing from threads, and on a shared CI machine extra threads
    spin against other jobs (measured: 10× slower wall time under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ground_truth():
    return generate(DATA, STEPS * BATCH, seed=1).x, generate(DATA, 4096, seed=2).x


def _batches(x: torch.Tensor, start_step: int = 0):
    """Batch s is the same for every arm and for a resumed run (a pure function of s)."""
    n = x.shape[0] // BATCH
    step = start_step
    while True:
        i = step % n
        yield x[i * BATCH : (i + 1) * BATCH]
        step += 1


@torch.no_grad()
def _measure(latents: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    mean_abs_c = topk_ortho_loss(latents[:1024], fraction=0.005, reduction="mean")[0]  # C = gᵀg / 1024
    return float(ev), float(mean_abs_c)


def _compare(name: str, plain: tuple[float, float], aosae: tuple[float, float]) -> None:
    print(f"\n{name}: plain EV {plain[0]:.3f} |C| {plain[1]:.5f}   aosae EV {aosae[0]:.3f} |C| {aosae[1]:.5f}")
    assert aosae[0] >= plain[0] - EV_TOLERANCE, f"{name}: aosae's explained variance {aosae[0]:.3f} vs {plain[0]:.3f}"
    assert aosae[1] < plain[1], f"{name}: aosae's selected mean |C| {aosae[1]:.5f} is not below {plain[1]:.5f}"


# ----------------------------------------------------------------------------- SAELens


def _saelens_arm(cls, cfg, x_train: torch.Tensor, steps: int = STEPS, start_step: int = 0, **trainer_kwargs):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = cls(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=LR, lr_end=LR, **trainer_kwargs
    )
    trainer = SAETrainer(trainer_cfg, sae, _batches(x_train, start_step))
    seen = {"tau": [], "last": None}  # each step's τ and the last step's output (older ones are freed)
    step = trainer.step

    def observed(batch):
        out = step(batch)
        seen["tau"].append(out.metrics.get("tau"))  # None for the plain arm
        seen["last"] = out
        return out

    trainer.step = observed
    return sae, trainer, seen


@torch.no_grad()
def _saelens_measure(sae, x: torch.Tensor) -> tuple[float, float]:
    sae.eval()
    f = sae.encode(x)
    g = f if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else f * sae.W_dec.norm(dim=1)
    return _measure(g, sae.decode(f), x)


def _saelens_configs(saelens, architecture: str):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    if architecture == "standard":
        common = dict(d_in=D, d_sae=D_SAE, l1_coefficient=1.0)
        return ((StandardTrainingSAE, StandardTrainingSAEConfig(**common)),
                (saelens.AosaeStandardTrainingSAE, saelens.AosaeStandardTrainingSAEConfig(**common)))
    common = dict(d_in=D, d_sae=D_SAE, k=K)
    return ((TopKTrainingSAE, TopKTrainingSAEConfig(**common)),
            (saelens.AosaeTopKTrainingSAE, saelens.AosaeTopKTrainingSAEConfig(**common)))


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_saelens_trainer_with_aosae_at_defaults_trains_as_well_with_lower_coactivation(
    saelens, ground_truth, architecture
):
    x_train, x_eval = ground_truth
    (plain_cls, plain_cfg), (aosae_cls, aosae_cfg) = _saelens_configs(saelens, architecture)
    plain, plain_trainer, _ = _saelens_arm(plain_cls, plain_cfg, x_train)
    plain_trainer.fit()
    sae, trainer, seen = _saelens_arm(aosae_cls, aosae_cfg, x_train)
    trainer.fit()
    _compare(f"SAELens SAETrainer {architecture}", _saelens_measure(plain, x_eval), _saelens_measure(sae, x_eval))

    # Logged through SAELens's own step log (what its wandb logger sends).
    log = trainer.build_train_step_log_dict(seen["last"], n_training_samples=STEPS * BATCH)
    for key in ("losses/orthogonality_loss", "metrics/orthogonality_penalty", "metrics/tau",
                "metrics/orthogonality_mean_abs_c"):
        assert key in log and torch.isfinite(torch.tensor(log[key])), key
    assert 0.01 <= log["metrics/tau"] <= 0.1 and sae.adaptive_tau.calibrated
    assert log["metrics/orthogonality_mean_abs_c"] > 0


def test_saelens_resumed_run_continues_the_same_tau(saelens, ground_truth, tmp_path):
    """Checkpoint half-way (SAETrainer's own checkpoints), resume in a fresh trainer and SAE the way
    LanguageModelSAETrainingRunner does: τ continues exactly as in the uninterrupted run."""
    x_train, _ = ground_truth
    steps = 40  # the checkpoint lands half-way
    cfg = saelens.AosaeTopKTrainingSAEConfig(d_in=D, d_sae=D_SAE, k=K, tau_calibration_steps=5)
    _, full, full_seen = _saelens_arm(saelens.AosaeTopKTrainingSAE, cfg, x_train, steps,
                                     n_checkpoints=1, checkpoint_path=str(tmp_path))
    full.fit()
    (checkpoint,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    done = int(checkpoint.name) // BATCH
    assert (checkpoint / "aosae_tau.json").is_file()
    cfg = saelens.AosaeTopKTrainingSAEConfig(d_in=D, d_sae=D_SAE, k=K, tau_calibration_steps=5)
    sae, resumed, resumed_seen = _saelens_arm(saelens.AosaeTopKTrainingSAE, cfg, x_train, steps, start_step=done)
    resumed.load_trainer_state(checkpoint)
    sae.load_weights_from_checkpoint(checkpoint)
    resumed.fit()
    taus_full, taus_resumed = full_seen["tau"][done:], resumed_seen["tau"]
    assert len(taus_resumed) == steps - done > 0
    assert taus_full[0] != cfg.tau_init, "τ had not moved by the checkpoint: the test would not see a reset"
    assert taus_resumed == pytest.approx(taus_full, rel=1e-5)


# ----------------------------------------------------------------------------- dictionary_learning


def _kept(cls, trainers: list):
    """cls, but every instance trainSAE builds is kept in `trainers` (trainSAE does not return them)."""

    class Kept(cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            trainers.append(self)

    return Kept


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_dictlearn_trainsae_with_aosae_at_defaults_trains_as_well_with_lower_coactivation(
    dictlearn, ground_truth, architecture
):
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.training import log_stats, trainSAE

    x_train, x_eval = ground_truth
    common = dict(steps=STEPS, activation_dim=D, dict_size=D_SAE, layer=0, lm_name="synthetic", device="cpu",
                  seed=0, lr=LR, warmup_steps=STEPS // 20)
    if architecture == "standard":
        plain_cls, aosae_cls = StandardTrainer, dictlearn.AosaeStandardTrainer
        common.update(l1_penalty=0.1, sparsity_warmup_steps=STEPS // 10)
    else:
        plain_cls, aosae_cls = TopKTrainer, dictlearn.AosaeTopKTrainer
        common.update(k=K, threshold_start_step=STEPS // 2)
    trainers: list = []
    # One trainSAE call: both trainers see the same batches, from the same seed.
    trainSAE(data=_batches(x_train), steps=STEPS, device="cpu",
             trainer_configs=[dict(trainer=_kept(plain_cls, trainers), **common),
                              dict(trainer=_kept(aosae_cls, trainers), **common)])
    measured = []
    for trainer in trainers:
        with torch.no_grad():
            f = trainer.ae.encode(x_eval)
            measured.append(_measure(f * trainer.ae.decoder.weight.norm(dim=0), trainer.ae.decode(f), x_eval))
    _compare(f"dictionary_learning trainSAE {architecture}", *measured)

    # Logged through trainSAE's own logger (log_stats → logging_parameters and the loss log).
    logs = queue.Queue()
    log_stats([trainers[1]], STEPS, x_eval[:BATCH], False, False, log_queues=[logs])
    log = logs.get_nowait()
    for key in ("tau", "orthogonality_penalty", "orthogonality_mean_abs_c", "orthogonality_loss"):
        assert key in log and torch.isfinite(torch.tensor(log[key])), key
    assert 0.01 <= log["tau"] <= 0.1 and log["orthogonality_mean_abs_c"] > 0
