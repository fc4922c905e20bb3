"""OUT/results.md and OUT/noise-scale.png from the gradient noise measurements under OUT (scripts/gradnoise_grid.sh):
    python3 scripts/gradnoise_report.py docs/results/gradnoise"""

import sys

from mpdit.errors import MPDiTError
from mpdit.evaluation.noise_scales import write_noise_report

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 scripts/gradnoise_report.py FOLDER (the OUT of scripts/gradnoise_grid.sh)")
    try:
        print(write_noise_report(sys.argv[1]).read_text())
    except MPDiTError as error:
        sys.exit(f"gradnoise_report: {error}")
