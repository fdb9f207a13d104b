"""The shapes that really are any: JSON objects, ASGI's scope and messages (dicts by the ASGI spec), and the
command line's parsed options.

Every other value in serving is typed by what it is (``Runtime``, ``FastWeights``, a request schema, an event);
these aliases are the one place ``Any`` stands for data whose shape the wire decides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

JsonObject: TypeAlias = dict[str, Any]  # a JSON object: response bodies, rule options, state statistics
# click's parsed options and option settings: each value's type is its option's declaration, which no checker sees
CliOptions: TypeAlias = dict[str, Any]
Scope: TypeAlias = MutableMapping[str, Any]  # ASGI connection scope
Message: TypeAlias = MutableMapping[str, Any]  # ASGI event
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
