"""Agents that speak the runner bridge's stdio protocol (see ``shoal.client._bridge``).

Run one under the bridge: ``shoal runner --session ID --token T -- python -m
shoal.client.runners.echo`` (or ``….openai_chat --model M``).
"""
