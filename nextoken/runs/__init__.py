"""The training-run viewer: a run's loss curves, samples and attention maps in a browser.

Two ways in, one page: ``nextoken runs RUN_DIR...`` (``app.build_app``, an app of its own over
run folders, which can watch a run while it trains) and ``/runs`` on ``nextoken serve``
(``app.served_run``, a mount the umbrella hands the model server, showing the served model's own
run). ``routes`` reads run folders and computes attention maps; the page is ``static/runs.html``
and ``runs.js``. The server knows nothing of this package: it imports nothing from it, and this
package reaches the training code (``nextoken.train.probe``) only when attention maps are asked for.
"""
