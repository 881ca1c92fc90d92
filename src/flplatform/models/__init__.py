"""The model store: uploaded files and their checks, global/local/SWAG/mean models, round history."""
