# The knowledge base of knowledge_search: the Article table, its full-text index
# (FTS5 + triggers on SQLite, a GIN index on PostgreSQL) and the seed articles.

from django.db import migrations, models

from skills.support import articles


class RunSQLOn(migrations.RunSQL):
    """RunSQL that runs only on one database vendor ("sqlite", "postgresql")."""

    def __init__(self, vendor, sql, reverse_sql):
        super().__init__(sql, reverse_sql)
        self.vendor = vendor

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == self.vendor:
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == self.vendor:
            super().database_backwards(app_label, schema_editor, from_state, to_state)


def load_seed_articles(apps, schema_editor):
    articles.load_articles(apps.get_model("skills", "Article"), using=schema_editor.connection.alias)


class Migration(migrations.Migration):

    dependencies = [
        ('skills', '0004_intentrule'),
    ]

    operations = [
        migrations.CreateModel(
            name='Article',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('slug', models.SlugField(max_length=100, unique=True)),
                ('title', models.CharField(max_length=200)),
                ('category', models.CharField(choices=[('billing', 'Billing'), ('orders', 'Orders'), ('shipping', 'Shipping'), ('returns', 'Returns'), ('account', 'Account'), ('technical', 'Technical'), ('products', 'Products'), ('sales', 'Sales'), ('policies', 'Policies'), ('general', 'General')], default='general', max_length=20)),
                ('body', models.TextField(help_text='The answer, as quoted to customers (plain text).')),
                ('tags', models.CharField(blank=True, help_text='Comma-separated words customers use for this.', max_length=300)),
                ('enabled', models.BooleanField(default=True, help_text='Disabled articles are never found.')),
                ('updated_at', models.DateTimeField(auto_now=True)),
            ],
            options={
                'ordering': ['category', 'slug'],
            },
        ),
        RunSQLOn('sqlite', articles.SQLITE_INDEX_SQL, articles.SQLITE_DROP_SQL),
        RunSQLOn('postgresql', articles.POSTGRES_INDEX_SQL, articles.POSTGRES_DROP_SQL),
        migrations.RunPython(load_seed_articles, migrations.RunPython.noop),
    ]
