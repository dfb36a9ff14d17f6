"""The lab: the research harness around the app, installed with the ``lab`` extra (``pip install -e ".[lab]"``).

- :mod:`.compare`: ``safedlora compare``, every method side by side under the comparison protocol
  (``docs/comparison.md``); its arms are data, one TOML file each in ``arms/``;
- :mod:`.small_dataset_check`: a user's small CSV through the app, every variant;
- :mod:`.run_diagnostics`: per-round diagnostics of a comparison's runs.

The app (``safedlora_app``) never imports the lab; the lab reads what the app writes through
:class:`safedlora_app.core.run_folder.RunFolder` and runs it through
:class:`safedlora_app.tools.simulation.LocalFlower`, as a user's ``flwr run`` would.
"""
