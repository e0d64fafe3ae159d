"""Training: the Program (mesh + layout + jitted steps), steps, optimizer, loop, checkpoints, metrics.
Wires model, parallel and data together; imports them, never infer or tools."""
