"""The registered experiments: importing this package registers each one (:mod:`..registry`).

The import order is the order of ``hyperadalora bench`` and of ``make bench`` (keep it unsorted):
the convergence runs first (the studies and the similarity experiment read their cache), nlg
before generality (which shares its GSM8K AdaLoRA runs), ``publish`` last.
"""

from . import convergence  # noqa: F401, I001
from . import cost_per_step  # noqa: F401
from . import step_cost  # noqa: F401
from . import compaction  # noqa: F401
from . import compaction_terms  # noqa: F401
from . import compile_cost  # noqa: F401
from . import scale_cpu  # noqa: F401
from . import scale_gpu  # noqa: F401
from . import precision  # noqa: F401
from . import gamma_sweep  # noqa: F401
from . import body_ablation  # noqa: F401
from . import similarity  # noqa: F401
from . import beyond  # noqa: F401
from . import convergence_quick  # noqa: F401
from . import nlg  # noqa: F401
from . import generality  # noqa: F401
from . import plan_calibrate  # noqa: F401
from . import plan_scale  # noqa: F401
from . import tuned  # noqa: F401
from . import tuning_cost  # noqa: F401  (after tuned: it reads tuned's results)
from . import transfer  # noqa: F401  (after tuned: it reuses tuned's runs)
from . import publish  # noqa: F401
