"""Where units go: pattern kinds found in the graph, placement rules (data), sites, and the plan."""
