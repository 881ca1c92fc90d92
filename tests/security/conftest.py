from tests.inference.conftest import add_model  # noqa: F401  (models stored straight into the database)
