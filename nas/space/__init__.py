"""Search spaces as data: subnets, their exact costs, YAML spaces with budgets, and the
backbone families' registry a space's ``backbone:`` value is read through."""
