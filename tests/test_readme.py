"""The README's complete LightningModule example runs as a user would run it."""

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_lightning_example_runs(tmp_path):
    section = README.split("## Your own LightningModule and LightningDataModule")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "my_fl.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "'final_acc': 0." in out.stdout and "'monitor': 'val_acc'" in out.stdout
    (metrics,) = (tmp_path / "runs" / "LitClassifier").glob("*/metrics.csv")
    assert "val_acc" in metrics.read_text().splitlines()[0]
