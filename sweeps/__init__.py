"""The sweep service: sweep files (spec), the plan, Ray Tune (execute), MLflow (tracking).

Ray is imported only inside this package, by its module ``ray_glue``. ``ray start`` (2.60)
turns token authentication on by default, but a driver presents its token (RAY_AUTH_TOKEN, or
~/.ray/auth_token) only when RAY_AUTH_MODE says so, and Ray reads that when it is first
imported: it is set here, before
any module of the package can import Ray (the plan reads a resumed run's Tune state; a driver
that had imported Ray without it could not join the local Ray it then started). Authentication
stays on; a cluster started with it disabled needs RAY_AUTH_MODE=disabled in the environment.
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")
