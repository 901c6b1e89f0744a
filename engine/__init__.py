"""The inference engine: the model's math (model/), checkpoint I/O (checkpoint/), the runtime that serves
one request (runtime/) and developer tools (tools/). Installed as ``dsv4.engine``."""
