"""Write the JSON Schema files: ``python -m loadwarden.producer.schemas``."""

from loadwarden.producer.schemas import write

for path in write():
    print(path)
