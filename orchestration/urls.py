from __future__ import annotations

from django.urls import path

from . import pages

app_name = "pages"
urlpatterns = [
    path("", pages.conversation_list, name="conversation-list"),
    path("conversations/<int:pk>/", pages.conversation_detail, name="conversation-detail"),
    path("runs/<int:pk>/", pages.run_detail, name="run-detail"),
]
