"""Print a command from the README's first screen exactly as written, so CI runs what a new user copies.

python3 .ci/readme_command.py serve     # the block under "**Run the server on the bundled model**"
python3 .ci/readme_command.py tests     # the block under "**Run the tests**"
python3 .ci/readme_command.py curl      # the block under "Then, from another shell, talk to a session"
"""

import re
import sys
from pathlib import Path

HEADINGS = {
    "serve": "**Run the server on the bundled model**",
    "tests": "**Run the tests**",
    "curl": "Then, from another shell, talk to a session",
}


def command(name: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = text.index(HEADINGS[name])
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    if block is None:
        raise SystemExit(f"README: no bash block after {HEADINGS[name]!r}")
    return block.group(1).strip()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in HEADINGS:
        raise SystemExit(__doc__)
    print(command(sys.argv[1]))
