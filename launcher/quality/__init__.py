"""Quality of a checkpoint: `launcher eval`, the HTML report of several candidates, the model card."""
