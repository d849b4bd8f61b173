"""Where inputs come from: the model (embedded, local folder, hub download) and the embedded assets."""
