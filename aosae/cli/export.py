"""`aosae export RUN_DIR --to saelens`: write a trained SAE in another library's format."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import tyro


def export(
    run_dir: tyro.conf.Positional[str],
    to: Literal["saelens"] = "saelens",
    out: Optional[str] = None,
) -> int:
    """Export a trained SAE. `--to saelens` writes a directory that
    `sae_lens.SAE.load_from_disk` loads without aosae (needs `pip install 'aosae[saelens]'`).

    Args:
        run_dir: Run directory written by `aosae train` (or any saved aosae SAE directory).
        to: Target format.
        out: Output directory (default: RUN_DIR/saelens). It must be new, empty, or an earlier
            export of the same SAE (which is replaced); anything else is refused, never overwritten.
    """
    from aosae.cli.checks import check_export_dir, check_output_dir, require_package
    from aosae.files import write_dir_atomically
    from aosae.nn.sae import SparseAutoencoder

    require_package("sae_lens", "--to saelens", "pip install 'aosae[saelens]'  (or: pip install sae-lens)")
    target = Path(out) if out else Path(run_dir) / to
    check_output_dir(target)
    sae = SparseAutoencoder.load(run_dir)  # every file checked: a damaged one is named, nothing is written
    check_export_dir(target, sae.cfg)
    from aosae.integrations.saelens import export_to_saelens

    write_dir_atomically(target, lambda tmp: export_to_saelens(sae, tmp))  # an earlier export stays until this one is whole
    print(f"wrote {target} (load it with sae_lens.SAE.load_from_disk({str(target)!r}))")
    return 0
