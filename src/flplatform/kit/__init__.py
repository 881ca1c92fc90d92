"""Generic pieces every domain uses: schema base types and text rules, pagination, background tasks."""
