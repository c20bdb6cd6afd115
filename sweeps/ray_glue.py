"""Every Ray import of the project, in one module: Ray's API moves between versions
(pyproject pins ``ray[tune]`` to 2.60.x), and here is the one place to read against a new one.

Importing this module imports Ray (a second or more), so the rest of ``sweeps`` imports it
inside the functions that start, join or read Ray: a dry run, the CLI's usage errors and the
post-processor never load Ray. The package's ``__init__`` has set ``RAY_AUTH_MODE`` by then.

Public API: ``ray``, ``tune``, ``ExperimentAnalysis`` (Tune's reading of a run folder's
state), ``Searcher`` (the base of ``sweeps.search.SideSearch``),
``NodeAffinitySchedulingStrategy`` (a task on a given node: ``sweeps.execute.node_problems``).

Ray's private modules, for what 2.60 offers no public API for (the version pin keeps them
there; each patch checks that the attribute it replaces exists, and leaves Ray's own
behaviour where it does not):

- ``private_utils.set_sigterm_handler``: ``ray.init`` installs its SIGTERM handler through it
  (``sweeps.execute._ray_keeps_our_sigterm``); ``private_utils.detect_fate_sharing_support``;
- ``private_services.ConsolePopen``: how ``ray.init`` starts a local Ray's processes
  (``sweeps.execute._ray_processes_in_their_own_group``);
- ``private_services.find_bootstrap_address`` / ``find_gcs_addresses`` and
  ``get_ray_address_file``: the cluster ``--address auto`` means
  (``sweeps.plan.resolve_auto_address``);
- ``trial_storage`` (``ray.train._internal.session.get_storage``, a developer API) and
  ``STORAGE_MARKER``: where a trial's folder is in the run's storage, which every attempt of
  it reads on whichever node it runs (``sweeps.execute.failed_for_good``), and the file Ray's
  driver leaves in the run's folder to tell whether a node sees that storage
  (``sweeps.execute.storage_problem``; Ray checks it only when a trial first persists a
  checkpoint).
"""

from __future__ import annotations

import ray
from ray import tune
from ray._common.utils import get_ray_address_file
from ray._private import services as private_services
from ray._private import utils as private_utils
from ray.train._internal.session import get_storage as trial_storage
from ray.train._internal.storage import _VALIDATE_STORAGE_MARKER_FILENAME as STORAGE_MARKER
from ray.tune import ExperimentAnalysis
from ray.tune.search import Searcher
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["STORAGE_MARKER", "ExperimentAnalysis", "NodeAffinitySchedulingStrategy", "Searcher",
           "get_ray_address_file", "private_services", "private_utils", "ray",
           "trial_storage", "tune"]
