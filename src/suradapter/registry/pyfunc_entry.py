"""MLflow models-from-code entry of a registered version (logged as its python_model).

Loading the version runs this file, so the model is built from the installed `suradapter`
package rather than unpickled.
"""

from mlflow.models import set_model

from suradapter.registry.pyfunc_model import AdaptedTextPathModel

set_model(AdaptedTextPathModel())
