"""The tools on top of the kit: the `finetune-recipes` command (cli) and what it runs: predict, export, tune,
compare, cv and audit, with their own reports. They run recipes as scripts and read output directories; nothing
outside this package imports them."""
