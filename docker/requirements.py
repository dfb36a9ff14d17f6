"""Print the app's dependencies from pyproject.toml, one per line, without the names given.

The images install flwr pinned (and, on Jetson, keep the base image's CUDA torch), so those are
left out:  python docker/requirements.py flwr > /tmp/requirements.txt
"""

import re
import sys
import tomllib

excluded = {name.lower() for name in sys.argv[1:]}
with open("pyproject.toml", "rb") as handle:
    dependencies = tomllib.load(handle)["project"]["dependencies"]
for dependency in dependencies:
    if re.split(r"[^A-Za-z0-9._-]", dependency, maxsplit=1)[0].lower() not in excluded:
        print(dependency)
