"""fedbat on Flower: the same clients, compressors and server logic over Flower messages.

``client_app.app`` is a Flower ClientApp whose train function is fedbat's local training; its
reply carries the fedbat packet. ``server_app.app`` is a ServerApp that runs fedbat's loop
(sampling, the downlink each client needs, validation, aggregation, checkpoints, loggers)
with Flower messages as the transport. ``deploy`` starts a local deployment
(``fedbat flower``). Needs the ``flower`` extra: ``pip install "fedbat[flower]"``.
"""
