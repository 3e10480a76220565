"""Pure routing logic, compiled at load time and run without I/O: topic syntaxes and source patterns
(``patterns``), the topic trie (``router``), target and header templates (``templates``), the ``where``
condition language (``where``), echo-loop detection (``loops``) and per-protocol header rules
(``headers``). Imports nothing of the runtime."""
