"""The home as the stages see it: local folders staged to and from an object-store home, and the coordination
database beside it (`workspace.Workspace`); the prepared-image cache as shard batches (`prepared`)."""
