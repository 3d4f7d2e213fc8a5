"""aosae dropped into SAELens's and dictionary_learning's own trainers, at its defaults, trains well.

Each test trains the library's plain arm and its aosae arm at the same settings (same data, batches,
seed, learning rate, sparsity) on synthetic activations with known features (correlated groups and a
hierarchy, aosae.data.synthetic), then measures on held-out tokens:

    explained variance  1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²            aosae arm within 0.05 of the plain arm
    selected mean |C|   mean |C_ij| over the top 0.5% pairs,     aosae arm lower
                        C = gᵀg / B on 1024 tokens, g = latents × decoder-row norms

Every training architecture each adapter wraps is trained (SAELens: every aosae_<arch>;
dictionary_learning: every Aosae<Trainer>), and the trained aosae SAE is saved the way the library
saves one and loaded back by the library as its plain architecture.

Run with `-s` to print the measured rows; AOSAE_DROPIN_TABLE=<file> writes them as the README's
markdown table. CI runs 200 steps of 512 tokens, d_sae 256, k 8, on the data below;
AOSAE_DROPIN_STEPS / _BATCH / _D_SAE / _K and AOSAE_DROPIN_DATA (JSON fields of SyntheticConfig)
run the same tests bigger or on other data.
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
ROWS: list[tuple[str, str, tuple[float, float], tuple[float, float]]] = []  # (library, arch, plain, aosae)

# Each architecture's own settings (the rest at the library's defaults); both arms get the same.
SAELENS_SETTINGS = {
    "standard": {"l1_coefficient": 1.0},
    "gated": {"l1_coefficient": 1.0},
    "topk": {"k": K},
    "abstopk": {"k": K},
    "batchtopk": {"k": K},
    "matryoshka_batchtopk": {"k": K, "matryoshka_widths": [D_SAE // 4, D_SAE]},
    "jumprelu": {},
    "matching_pursuit": {"max_iterations": K},  # (default d_in iterations: 8× slower, same verdict)
}
DICTLEARN_SETTINGS = {
    "StandardTrainer": {"l1_penalty": 0.1, "sparsity_warmup_steps": STEPS // 10},
    "StandardTrainerAprilUpdate": {"l1_penalty": 0.1, "sparsity_warmup_steps": STEPS // 10},
    # p_end 0.5, not the default 0: PAnnealTrainer's own "Lp" norm divides by p (ZeroDivisionError at p = 0)
    "PAnnealTrainer": {"sparsity_warmup_steps": STEPS // 10, "anneal_start": STEPS // 2, "p_end": 0.5},
    "GatedSAETrainer": {"l1_penalty": 0.1, "sparsity_warmup_steps": STEPS // 10},
    "GatedAnnealTrainer": {"sparsity_warmup_steps": STEPS // 10, "anneal_start": STEPS // 2},
    "TopKTrainer": {"k": K, "threshold_start_step": STEPS // 2},
    "BatchTopKTrainer": {"k": K, "threshold_start_step": STEPS // 2},
    "MatryoshkaBatchTopKTrainer": {"k": K, "threshold_start_step": STEPS // 2, "group_fractions": [0.25, 0.75]},
    "JumpReluTrainer": {"target_l0": K, "sparsity_warmup_steps": STEPS // 10},
}


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


@pytest.fixture(scope="module", autouse=True)
def table():
    """After the module: the measured rows as the README's markdown table, if AOSAE_DROPIN_TABLE names a file."""
    yield
    path = os.environ.get("AOSAE_DROPIN_TABLE")
    if path and ROWS:
        lines = ["| trainer | arch | steps × tokens | EV plain | EV aosae | mean \\|C\\| plain | mean \\|C\\| aosae |",
                 "|---|---|---|---|---|---|---|"]
        for library, arch, plain, aosae in ROWS:
            lines.append(f"| {library} | {arch} | {STEPS} × {BATCH} | {plain[0]:.3f} | {aosae[0]:.3f} | "
                         f"{plain[1]:.5f} | {aosae[1]:.5f} |")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def _compare(library: str, arch: str, plain: tuple[float, float], aosae: tuple[float, float]) -> None:
    ROWS.append((library, arch, plain, aosae))
    name = f"{library} {arch}"
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


def _saelens_configs(architecture: str):
    from sae_lens.registry import get_sae_training_class

    common = dict(d_in=D, d_sae=D_SAE, **SAELENS_SETTINGS[architecture])
    plain_cls, plain_cfg = get_sae_training_class(architecture)
    aosae_cls, aosae_cfg = get_sae_training_class(f"aosae_{architecture}")
    return (plain_cls, plain_cfg(**common)), (aosae_cls, aosae_cfg(**common))


@torch.no_grad()
def _saelens_loads_as_plain(sae, plain_cls, plain_cfg, x: torch.Tensor, path) -> None:
    """Saved as SAELens saves a finished SAE (save_inference_model), the aosae SAE loads as the plain
    architecture's inference SAE, and exactly as the plain training SAE with the same weights does."""
    from sae_lens import SAE

    twin = plain_cls(plain_cfg)
    twin.load_state_dict(sae.state_dict())
    sae.save_inference_model(path / "aosae")
    twin.save_inference_model(path / "plain")
    loaded, expected = SAE.load_from_disk(str(path / "aosae")), SAE.load_from_disk(str(path / "plain"))
    assert type(loaded) is type(expected) and loaded.cfg.architecture() == expected.cfg.architecture()
    assert not loaded.cfg.architecture().startswith("aosae")
    torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)


@pytest.mark.parametrize("architecture", list(SAELENS_SETTINGS))
def test_saelens_trainer_with_aosae_at_defaults_trains_as_well_with_lower_coactivation(
    saelens, ground_truth, architecture, tmp_path
):
    x_train, x_eval = ground_truth
    (plain_cls, plain_cfg), (aosae_cls, aosae_cfg) = _saelens_configs(architecture)
    plain, plain_trainer, _ = _saelens_arm(plain_cls, plain_cfg, x_train)
    plain_trainer.fit()
    sae, trainer, seen = _saelens_arm(aosae_cls, aosae_cfg, x_train)
    trainer.fit()
    _compare("SAELens `SAETrainer`", architecture, _saelens_measure(plain, x_eval), _saelens_measure(sae, x_eval))

    # Logged through SAELens's own step log (what its wandb logger sends).
    log = trainer.build_train_step_log_dict(seen["last"], n_training_samples=STEPS * BATCH)
    for key in ("losses/orthogonality_loss", "metrics/orthogonality_penalty", "metrics/tau",
                "metrics/orthogonality_mean_abs_c"):
        assert key in log and torch.isfinite(torch.tensor(log[key])), key
    assert 0.01 <= log["metrics/tau"] <= 0.1 and sae.adaptive_tau.calibrated
    assert log["metrics/orthogonality_mean_abs_c"] > 0
    _saelens_loads_as_plain(sae, plain_cls, plain_cfg, x_eval[:64], tmp_path)


@pytest.mark.parametrize("architecture", list(SAELENS_SETTINGS))
def test_saelens_resumed_run_continues_the_same_tau(saelens, ground_truth, tmp_path, architecture):
    """Checkpoint half-way (SAETrainer's own checkpoints), resume in a fresh trainer and SAE the way
    LanguageModelSAETrainingRunner does: τ continues exactly as in the uninterrupted run."""
    from sae_lens.registry import get_sae_training_class

    x_train, _ = ground_truth
    steps = 40  # the checkpoint lands half-way
    sae_cls, cfg_cls = get_sae_training_class(f"aosae_{architecture}")

    def config():
        return cfg_cls(d_in=D, d_sae=D_SAE, tau_calibration_steps=5, **SAELENS_SETTINGS[architecture])

    _, full, full_seen = _saelens_arm(sae_cls, config(), x_train, steps, n_checkpoints=1, checkpoint_path=str(tmp_path))
    full.fit()
    (checkpoint,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    done = int(checkpoint.name) // BATCH
    assert (checkpoint / "aosae_tau.json").is_file()
    sae, resumed, resumed_seen = _saelens_arm(sae_cls, config(), x_train, steps, start_step=done)
    resumed.load_trainer_state(checkpoint)
    sae.load_weights_from_checkpoint(checkpoint)
    resumed.fit()
    taus_full, taus_resumed = full_seen["tau"][done:], resumed_seen["tau"]
    assert len(taus_resumed) == steps - done > 0
    assert taus_full[0] != config().tau_init, "τ had not moved by the checkpoint: the test would not see a reset"
    assert taus_resumed == pytest.approx(taus_full, rel=1e-5)


# ----------------------------------------------------------------------------- dictionary_learning


def _kept(cls, trainers: list):
    """cls, but every instance trainSAE builds is kept in `trainers` (trainSAE does not return them)."""

    class Kept(cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            trainers.append(self)

    return Kept


@pytest.mark.parametrize("trainer_name", list(DICTLEARN_SETTINGS))
def test_dictlearn_trainsae_with_aosae_at_defaults_trains_as_well_with_lower_coactivation(
    dictlearn, ground_truth, trainer_name, tmp_path
):
    from dictionary_learning.training import log_stats, trainSAE
    from dictionary_learning.utils import load_dictionary

    x_train, x_eval = ground_truth
    common = dict(steps=STEPS, activation_dim=D, dict_size=D_SAE, layer=0, lm_name="synthetic", device="cpu",
                  seed=0, lr=LR, warmup_steps=STEPS // 20, **DICTLEARN_SETTINGS[trainer_name])
    aosae_cls = getattr(dictlearn, f"Aosae{trainer_name}")
    plain_cls = aosae_cls.__mro__[2]  # Aosae<Trainer> -> _OrthogonalityPenalty -> <Trainer>
    assert plain_cls.__name__ == trainer_name
    trainers: list = []
    # One trainSAE call: both trainers see the same batches, from the same seed.
    trainSAE(data=_batches(x_train), steps=STEPS, device="cpu", save_dir=str(tmp_path),
             trainer_configs=[dict(trainer=_kept(plain_cls, trainers), **common),
                              dict(trainer=_kept(aosae_cls, trainers), **common)])
    measured = []
    for trainer in trainers:
        with torch.no_grad():
            f = trainer.ae.encode(x_eval)
            g = f * dictlearn._decoder_norms(trainer.ae)
            measured.append(_measure(g, trainer.ae.decode(f), x_eval))
    _compare("dictionary_learning `trainSAE`", trainer_name, *measured)

    # Logged through trainSAE's own logger (log_stats → logging_parameters and the loss log).
    logs = queue.Queue()
    log_stats([trainers[1]], STEPS, x_eval[:BATCH], False, False, log_queues=[logs])
    log = logs.get_nowait()
    for key in ("tau", "orthogonality_penalty", "orthogonality_mean_abs_c", "orthogonality_loss"):
        assert key in log and torch.isfinite(torch.tensor(log[key])), key
    assert 0.01 <= log["tau"] <= 0.1 and log["orthogonality_mean_abs_c"] > 0

    # Saved by trainSAE, loaded by dictionary_learning's own loader as the plain dictionary.
    plain_loaded, _ = load_dictionary(str(tmp_path / "trainer_0"), "cpu")
    loaded, config = load_dictionary(str(tmp_path / "trainer_1"), "cpu")
    assert type(loaded) is type(plain_loaded) is type(trainers[1].ae)
    with torch.no_grad():  # (AutoEncoder.from_pretrained folds decoder norms into the encoder: compare x̂)
        torch.testing.assert_close(loaded(x_eval[:64]), trainers[1].ae(x_eval[:64]), rtol=1e-5, atol=1e-5)
