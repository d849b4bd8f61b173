"""Run records and what they let us undo: each run's record, the output lock and folder names,
orphaned containers, rollback, and the list/status/logs views."""
