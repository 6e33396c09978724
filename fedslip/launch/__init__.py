"""Launchers: start the processes that carry a run, above the round loop (``fedslip.rounds``).

- ``simulation.simulate``: the run on Flower's simulation runtime (Ray) in this process
  (``engine = "flower-sim"``).
- ``deployment.LocalDeployment`` / ``deployment.run_local``: a SuperLink and SuperNodes on 127.0.0.1,
  and ``flwr run`` of the FedSLIP app on them (``fedslip deploy-local``).
- ``app_dir``: the FedSLIP Flower app as a directory for ``flwr run`` (``fedslip flower-app``): a
  ``pyproject.toml`` whose components come from the installed package; ``deployment`` runs it.
- ``environment``: what every Flower process of a run gets (environment variables, ``FLWR_HOME``,
  Ray's temp dir), shared by both.

The engines (``fedslip.engines``) only carry the messages; nothing here is imported by them.
"""
