"""The smallest agent for the runner bridge: answers every prompt with its content.

``shoal runner --session ID --token T -- python -m shoal.client.runners.echo``
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    for line in sys.stdin:
        frame = json.loads(line)
        if frame.get("type") == "prompt":
            answer = {
                "type": "message.completed",
                "prompt_id": frame["prompt_id"],
                "content": frame["content"],
            }
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
