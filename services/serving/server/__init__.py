"""The model server: Flask + gunicorn speaking Open Inference Protocol V2 (and KServe V1).

Kept import-light: gunicorn's master imports ``gunicorn_conf`` and the CLI imports this
package, neither may pull in Flask or a framework. Import ``create_app`` from ``.app``.
"""

from services.serving.server.settings import Layout, ServerSettings, cpu_limit, layout

__all__ = ["Layout", "ServerSettings", "cpu_limit", "layout"]
