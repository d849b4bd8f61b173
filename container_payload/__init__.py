"""The container payload: plain scripts run by the image's own python3.

It imports torch, transformers and ModelOpt, which the host never does. The
launcher talks to it through a job JSON file and `@@spark-nvfp4` event lines on
stdout (events.py).
"""
