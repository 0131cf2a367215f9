"""The README's examples run as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _block_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r".*?```python\n(.*?)```", README, flags=re.S)
    assert match, f"README has no python block after {marker!r}"
    return match.group(1)


def test_readme_starts_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]


def test_readme_callback_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_block_after("<!-- README example: callbacks"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mean = eval(proc.stdout.strip().splitlines()[-1])  # the example's last line prints the mean metrics dict
    assert set(mean) == {"fpr95", "auroc", "aupr_in", "aupr_out"} and all(0 <= v <= 1 for v in mean.values())
    results = list((tmp_path / "runs" / "my_project").glob("version_*/ood_results.json"))
    assert len(results) == 1 and (results[0].parent / "scores.npz").is_file()
