"""pfkernels.records: records I/O without matplotlib; pfkernels.report leaves the backend alone."""

import subprocess
import sys

from pfkernels import records, report


def test_report_reexports_the_records_names():
    for name in ("MetricsWriter", "read_jsonl", "write_csv", "to_jsonable", "central_flow_record"):
        assert getattr(report, name) is getattr(records, name)


def test_records_import_no_matplotlib_and_report_keeps_the_backend():
    # A fresh interpreter: this one has matplotlib loaded by other tests already.
    code = (
        "import sys\n"
        "import pfkernels, pfkernels.eos, pfkernels.records\n"
        "assert 'matplotlib' not in sys.modules, 'records or eos imported matplotlib'\n"
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "import pfkernels.report\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'report imported pyplot'\n"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
