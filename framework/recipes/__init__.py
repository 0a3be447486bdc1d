"""One module per command (distill, train, prune, quantize, eval, cache_teacher, export, pipeline), the hooks
they compose (`hooks`) and the builders they share (`common`): the top of the stack, nothing below imports it."""
