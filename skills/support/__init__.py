"""The agent skills of the customer-support workflow, and the clients they share."""
